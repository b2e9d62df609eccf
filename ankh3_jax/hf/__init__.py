"""Hugging Face T5 formats in three parts: `config` (config.json <-> T5Config), `weights`
(tensor files and the parameter mapping) and `tokenizer` (vocabulary, extra_ids);
`ankh3_jax.convert` puts them together (import_hf, export_hf, `ankh3-convert`)."""
