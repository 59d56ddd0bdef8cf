"""Text and class conditioning encoders (see :mod:`mdm_fast.text.encoders`)."""
from mdm_fast.text.encoders import (ClassLabelEncoder, HFTextEncoder, PrecomputedEncoder, TextEncoder,  # noqa: F401
                                    build_text_encoder, drop_conditioning, encode_prompts, encodes_prompts,
                                    minilm_encoder, minilm_path, pad_tokens)
