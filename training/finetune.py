"""Fine-tune scPaLM's cell classifier: `python training/finetune.py --help`."""

import sys

from modeling_scpalm.finetuning import main

if __name__ == "__main__":
    main(sys.argv[1:])
