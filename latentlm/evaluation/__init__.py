"""Evaluation: the protocol of `latentlm evaluate` (`protocol`), its judges and metrics, reports,
stage-1 reconstruction and the text-to-text evaluation."""
