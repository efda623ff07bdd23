"""Writes a small Llama with random weights (no download): `python make_model.py DIR [--wide | --windowed]`.

`--wide`: four layers of eight KV heads, 512 KiB of cache a block of 32 float32 tokens (16 KiB
without), so that a prompt's blocks take a measurable time to cross a shaped link.
`--windowed`: four layers, every other one attending to a sliding window of 48 tokens, which vLLM
keeps as two KV cache groups (full attention, sliding window)."""

import sys


def main() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = sys.argv[2:] == ["--wide"]
    windowed = sys.argv[2:] == ["--windowed"]
    torch.manual_seed(0)
    window = {}
    if windowed:
        # Not a multiple of the 32-token block, so a window starts inside a block.
        window = {
            "layer_types": ["sliding_attention", "full_attention"] * 2,
            "sliding_window": 48,
        }
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=512 if wide else 256,
        intermediate_size=1024 if wide else 512,
        num_hidden_layers=4 if wide or windowed else 2,
        num_attention_heads=8 if wide else 4,
        num_key_value_heads=8 if wide else 2,
        head_dim=64,
        max_position_embeddings=2048,
        # Large weights make the greedy choice clear-cut, so tokens do not flip on rounding
        # differences between computing a prefix and loading it.
        initializer_range=0.2,
        torch_dtype="float32",
        tie_word_embeddings=False,
        **window,
    )
    LlamaForCausalLM(config).save_pretrained(sys.argv[1], safe_serialization=True)


if __name__ == "__main__":
    main()
