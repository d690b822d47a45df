"""Sequence-to-sequence tasks (translation, summarization, question answering): data, metrics, stages."""
