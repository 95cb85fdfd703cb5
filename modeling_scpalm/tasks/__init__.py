"""The paper's evaluation tasks on top of the model: unsupervised cell-type annotation (`annotation`), imputation
(`imputation`), pathway identification (`pathways`) and drug response (`drug_response`). They import the library,
never the other way round; `benchmarks/` runs them beside their peers."""
