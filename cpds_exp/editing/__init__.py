"""The editing loop and its loss terms: the editor, the score and CUT terms, feature capture, patch
selectors and their training (SPEC §2–4)."""
