"""`specdec distill`: train a small draft to imitate the target on the user's own text.

Data flow: corpus.py (text -> token sequences, with a held-out split) -> train.py (the
target's next-token distributions teach a shallow copy of it, teacher-forced) ->
draft_models/distilled_draft.py (the draft directory: weights, config, token map) ->
evaluate.py (acceptance and speedup on held-out text, before and after).
"""
