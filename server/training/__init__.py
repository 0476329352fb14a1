"""Prefix training (Li & Liang, 2021) and prompt tuning (Lester et al., 2021): learn a task's prefix, or its
soft prompt, on the frozen base model the server loads.

What is trained is what is served: the training forward pass lays the prefix into the cache with the
engine's own ``PrefillBatch`` (same cache layout, 4-D mask and position ids), a soft prompt goes before
the tokens' embeddings at the positions the engine gives it, and the result is exported in the native
format and as a PEFT adapter through ``prefix_store``.

Modules, one concept each: ``config`` (the run's options), ``data`` (JSONL examples), ``trained_params``
(what a method trains, as the loop sees it: the one seam between the methods), ``prefix_params`` (the
trainable prefix, direct or through the reparameterisation MLP), ``soft_prompt_params`` (the trainable
soft prompt), ``init_text`` (real-word activation initialisation), ``forward`` (logits and loss through
the engine's injection, or after a soft prompt), ``loop`` (the training loop), ``checkpoint`` (per-epoch,
for an exact resume), ``export`` (native + PEFT), ``model_facts`` (the tokenizer and config, read before
the weights), ``determinism`` (thread settings pinned for bit-identical reruns), ``run`` (a whole run:
check, initialise or resume, train, export), ``push`` (upload to a server), ``sizes`` (parameter counts)
and ``errors``.
"""
