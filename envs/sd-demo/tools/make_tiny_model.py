"""Build a tiny random-weight Stable Diffusion 3 pipeline folder, offline.

    python make_tiny_model.py OUT_DIR [--seed 0] [--layers 2] [--sd35]

The folder has the diffusers `StableDiffusion3Pipeline` layout (transformer, vae,
three text encoders, three tokenizers, scheduler) so the trainer loads it exactly
like SD3 medium / SD3.5 medium, but every component has a few thousand weights.
Nothing is downloaded: configs are written here and tokenizers are built in code.
"""

from __future__ import annotations

import argparse
import string
import sys
from pathlib import Path


def build_clip_tokenizer():
    """A byte-level-free CLIP BPE tokenizer over lower-case letters, digits and punctuation."""
    from transformers import CLIPTokenizer

    symbols = list(string.ascii_lowercase + string.digits + ",.!?'-:;()")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols:
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    # a few merges so common caption words become single tokens
    merges = []
    for word in ("red", "blue", "green", "circle", "square", "the", "and", "on"):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            left, right = pieces[0], pieces[1]
            merged = left + right
            merges.append((left, right))
            if merged not in vocab:
                vocab[merged] = len(vocab)
            pieces = [merged] + pieces[2:]
    merges = list(dict.fromkeys(merges))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_t5_tokenizer():
    """A T5 (Unigram) tokenizer whose pieces are single characters, built with `tokenizers`."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for char in string.ascii_lowercase + string.digits + ",.!?'-:;()":
        pieces.append((char, -3.0))
        pieces.append(("\u2581" + char, -3.5))
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def build_pipeline(seed: int = 0, layers: int = 2, sd35: bool = False):
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    clip_tokenizer = build_clip_tokenizer()
    t5_tokenizer = build_t5_tokenizer()

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,  # default inference size 64 px
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=layers,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=96,
        dual_attention_layers=(0,) if sd35 else (),
        qk_norm="rms_norm" if sd35 else None,
    )
    torch.manual_seed(seed + 1)
    # SD3-style VAE: 16 latent channels, 8x down-sampling, shift/scale factors, no quant convs
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )

    def clip_config():
        return CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=32,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_act="gelu",
        )

    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModelWithProjection(clip_config())
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config())
    torch.manual_seed(seed + 4)
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=64,  # = transformer.joint_attention_dim, >= 2 x CLIP hidden size
            d_kv=16,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    parser.add_argument("--sd35", action="store_true", help="SD3.5-style blocks (qk rms-norm, dual attention)")
    args = parser.parse_args(argv)
    pipeline = build_pipeline(seed=args.seed, layers=args.layers, sd35=args.sd35)
    pipeline.save_pretrained(args.out_dir, safe_serialization=True)
    print(f"tiny SD3 pipeline written to {args.out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
