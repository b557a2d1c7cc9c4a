"""The one glossary of dimension letters used in shapes, einsums and comments.

    B  batch (sequences in a step)        T  tokens per sequence in a step
    S  key/value slots of the cache       N  flattened tokens (B * T)
    D  hidden size (model dim)            V  vocabulary
    H  query heads                        G  key/value heads (GQA groups)
    C  channels per head (head_dim)       R  query heads per kv head (H // G)
    E  routed experts                     K  experts per token (top-k)
    F  intermediate size of an MLP        A  routing assignments (N * K)
    P  padded rows of expert-sorted assignments (tiles * rows per tile)
    L  decoder layers                     W  KV blocks in a row's block table
    M  words of a token bitmask (⌈V/32⌉)  SLOTS  the engine's sequence slots
    PACK  a step's packed output row (token, logprob, 20 alternatives and their logprobs)
    ROWS  a step's output rows (B; + B·T prompt scores in prefill; + DEV on a mesh)
    ALT  top alternatives per token (20)      BIAS  logit-bias entries per row (64)

Arrays are annotated with jaxtyping, e.g. ``Float[Array, "B T D"]``; einsum subscripts use the
same letters in lower case.
"""

from jaxtyping import Array, Bool, Float, Int

__all__ = ["Array", "Bool", "Float", "Int"]
