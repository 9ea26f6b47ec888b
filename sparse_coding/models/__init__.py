"""Stage 2, language models: one interface over TransformerLens, Hugging Face and our own nanoGPT models
(language_model.py), the GPT itself (nanogpt.py) and its trainer (nanogpt_train.py)."""
