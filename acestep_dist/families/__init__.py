"""Model families behind one small interface (see DESIGN.md): load, encode_audio, encode_text,
tokenize_lyrics, condition, training_loss, generate, lora_targets. ACE-Step 1.5 is the first;
ACE-Step v1 (3.5 B) follows in ``ace_step_v1``."""
