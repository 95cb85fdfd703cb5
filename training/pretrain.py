"""Pretrain scPaLM (both stages): `python training/pretrain.py --help`, or under `accelerate launch`."""

from modeling_scpalm.pretraining import main

if __name__ == "__main__":
    main()
