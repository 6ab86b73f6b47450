"""ACE-Step v1 (3.5B): the DiT with upstream's key names, the music DCAE + vocoder, UMT5 text and
the v1 lyric tokenizer, behind the family interface.

Importing the package is cheap; the model code loads when a module is imported."""
