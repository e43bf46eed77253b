"""Text encoders: umT5 (Wan2.1) and its tokenizer."""

from astraea_jax.models.text.tokenizer import (TokenizerFilesError,
                                               UMT5Tokenizer, clean_prompt)
from astraea_jax.models.text.umt5 import (UMT5Config, UMT5Encoder,
                                          wan_prompt_embeds)

__all__ = ["TokenizerFilesError", "UMT5Config", "UMT5Encoder",
           "UMT5Tokenizer", "clean_prompt", "wan_prompt_embeds"]
