"""`acedist annotate`: estimated tempo, key, metre and lyric language, and quality checks.

- ``estimators``: tempo (bpm), key and scale, time-signature numerator from a song's audio, and
  the lyrics' language from their text, each with a confidence.
- ``quality``: clipping, loudness, digital silence inside a song, lyrics too long for the audio.
- ``fingerprint``: spectral-peak landmarks that find the same recording under two names.
- ``analysis``: one song through all of them (what a Ray task runs).
- ``table``: given and estimated values merged into the rows a person reviews and prep reads.
"""
