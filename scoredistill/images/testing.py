"""Helpers for tests of image components: tiny digits teachers and a tiny FID classifier (seconds, not minutes)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from scoredistill.images.classifier import ClassifierSettings
from scoredistill.images.training import DigitsTeacherSettings, train_digits_teacher

#: ``--set`` overrides that make the digits preset's teacher tiny (about 10k parameters)
TINY_TEACHER_OVERRIDES = ["teacher.block_out_channels=[8,16]", "teacher.norm_num_groups=4", "teacher.attention=false",
                          "teacher.train_steps=4", "teacher.train_batch_size=16", "teacher.sampler_steps=3"]


def tiny_teacher_settings(**kw) -> DigitsTeacherSettings:
    base = dict(block_out_channels=[8, 16], norm_num_groups=4, attention=False, train_steps=4, train_batch_size=16)
    return DigitsTeacherSettings(**{**base, **kw})


def tiny_teacher_folder(folder: Path, **kw) -> Path:
    """Train (a few steps) a tiny digits teacher into ``folder``."""
    return train_digits_teacher(tiny_teacher_settings(**kw), Path(folder), progress=False, log=lambda msg: None)


def tiny_classifier_settings() -> ClassifierSettings:
    return ClassifierSettings(channels=(8, 8, 8, 8), stem_width=8, input_size=16, epochs=1, batch_size=128)


def tiny_clip_config(tokenizer, dim: int, max_length: int, layers: int = 2, **kw):
    """A tiny random ``CLIPTextConfig`` that matches ``tokenizer`` (its vocabulary and special tokens)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=layers,
                          num_attention_heads=2, max_position_embeddings=max_length, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kw)


def tiny_diffusers_teacher_folder(folder: Path, num_class_embeds: Optional[int] = None) -> Path:
    """A tiny random-weight 1x8x8 ``UNet2DModel`` with an EDM scheduler config, saved into ``folder`` as a user would;
    class-conditional with ``num_class_embeds`` labels."""
    import diffusers
    import torch

    torch.manual_seed(0)
    diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                          down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                          norm_num_groups=4, num_class_embeds=num_class_embeds).save_pretrained(folder / "unet")
    diffusers.EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5).save_pretrained(folder / "scheduler")
    return folder


def clip_tokenizer_files(folder: Path) -> Path:
    """A tiny CLIP BPE tokenizer written by hand (``vocab.json`` + ``merges.txt``): the 256 byte symbols and their
    ``</w>`` forms, a few merges, the start / end tokens; loadable with ``CLIPTokenizer.from_pretrained``."""
    import json

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    shifted = iter(range(256, 512))  # byte-level BPE: bytes that are not printable get the next free code points
    symbols = [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]
    merges = ["t h", "th e</w>", "c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>"]
    vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(dict.fromkeys(vocab))}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def tiny_sd_pipeline_folder(folder: Path, *, sample_size: int = 8, latent_channels: int = 4, text_dim: int = 16,
                            max_length: int = 8, scheduler: str = "DDIMScheduler") -> Path:
    """A tiny random-weight SD1.5-shaped pipeline (``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel`` +
    ``CLIPTokenizer``, a VP scheduler) saved with ``save_pretrained`` into ``folder``, as a user's would be."""
    import diffusers
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=text_dim, attention_head_dim=2)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=4, sample_size=sample_size * 2, scaling_factor=0.18215)
    tok_dir = clip_tokenizer_files(folder / ".tokenizer_files")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=max_length)
    text = CLIPTextModel(tiny_clip_config(tokenizer, text_dim, max_length, layers=1))
    sched = getattr(diffusers, scheduler)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text.eval(), tokenizer=tokenizer, unet=unet, scheduler=sched,
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    import shutil

    shutil.rmtree(tok_dir)
    return folder


def tiny_sdxl_pipeline_folder(folder: Path, *, sample_size: int = 8, latent_channels: int = 4, dims: tuple[int, int] = (8, 12),
                              projection_dim: int = 6, max_length: int = 8) -> Path:
    """A tiny random-weight SDXL-shaped pipeline (two CLIP encoders, the second with projection; a ``text_time`` UNet)."""
    import shutil

    import diffusers
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(0)
    time_dim = 4
    unet = diffusers.UNet2DConditionModel(
        sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=sum(dims), attention_head_dim=2,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=projection_dim + 6 * time_dim)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=4, sample_size=sample_size * 2, scaling_factor=0.13025)
    tok_dir = clip_tokenizer_files(folder / ".tokenizer_files")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=max_length)

    text = CLIPTextModel(tiny_clip_config(tokenizer, dims[0], max_length)).eval()
    text_2 = CLIPTextModelWithProjection(tiny_clip_config(tokenizer, dims[1], max_length, projection_dim=projection_dim)).eval()
    sched = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
                                               tokenizer_2=tokenizer, unet=unet, scheduler=sched)
    pipe.save_pretrained(str(folder))
    shutil.rmtree(tok_dir)
    return folder


def t5_tokenizer(max_length: int = 8):
    """A tiny ``T5TokenizerFast`` from a hand-made tokenizers ``Unigram`` model (letters, space marker, specials)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -2.0) for c in "\u2581abcdefghijklmnopqrstuvwxyz"]
    vocab += [("\u2581the", -1.0), ("\u2581cat", -1.0), ("\u2581dog", -1.0), ("\u2581red", -1.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
                           model_max_length=max_length)


def tiny_flow_pipeline_folder(folder: Path, kind: str = "sd3", *, t5: bool = True, max_length: int = 8) -> Path:
    """A tiny random-weight SD3-shaped (CLIP-L, CLIP-G, optional T5) or Flux-shaped (CLIP, T5) pipeline folder."""
    import shutil

    import diffusers
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    folder = Path(folder)
    torch.manual_seed(0)
    tok_dir = clip_tokenizer_files(folder / ".tokenizer_files")
    clip_tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=max_length)

    t5_tok = t5_tokenizer(max_length)
    t5_model = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                                       decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4 if kind == "sd3" else 2,
                                  block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                                  scaling_factor=1.5305, shift_factor=0.0609)
    if kind == "sd3":
        net = diffusers.SD3Transformer2DModel(sample_size=4, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4,
                                              num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=8,
                                              pooled_projection_dim=6 + 6, out_channels=4, pos_embed_max_size=4)
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=net, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
            text_encoder=CLIPTextModelWithProjection(tiny_clip_config(clip_tok, 8, max_length, projection_dim=6)).eval(),
            tokenizer=clip_tok, tokenizer_2=clip_tok,
            text_encoder_2=CLIPTextModelWithProjection(tiny_clip_config(clip_tok, 12, max_length, projection_dim=6)).eval(),
            text_encoder_3=t5_model if t5 else None, tokenizer_3=t5_tok if t5 else None)
    else:
        net = diffusers.FluxTransformer2DModel(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                               num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                               guidance_embeds=True, axes_dims_rope=(2, 2, 4))
        sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64)
        clip = CLIPTextModel(tiny_clip_config(clip_tok, 8, max_length)).eval()
        pipe = diffusers.FluxPipeline(transformer=net, scheduler=sched, vae=vae, text_encoder=clip, tokenizer=clip_tok,
                                      text_encoder_2=t5_model, tokenizer_2=t5_tok)
    pipe.save_pretrained(str(folder))
    shutil.rmtree(tok_dir)
    return folder


def tiny_clip_model_folder(folder: Path, image_size: int = 16, max_length: int = 16) -> Path:
    """A tiny random-weight ``CLIPModel`` (text and vision towers, projections) with its ``CLIPProcessor`` (the hand-made
    BPE tokenizer, a ``CLIPImageProcessor`` at ``image_size``), saved into ``folder``: what ``eval.clip_model`` names."""
    import shutil

    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer, CLIPVisionConfig

    folder = Path(folder)
    torch.manual_seed(0)
    tok_dir = clip_tokenizer_files(folder / ".tokenizer_files")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=max_length)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=image_size, patch_size=4)
    config = CLIPConfig(text_config=tiny_clip_config(tokenizer, 16, max_length, layers=1).to_dict(),
                        vision_config=vision.to_dict(), projection_dim=8)
    CLIPModel(config).eval().save_pretrained(str(folder))
    images = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(str(folder))
    shutil.rmtree(tok_dir)
    return folder


def run_on_tiny_digits(method: str, teacher_folder: Path, out: Path, monkeypatch, extra=()) -> list[dict]:
    """``scoredistill run METHOD --preset digits`` for two steps on the tiny cached teacher ``teacher_folder`` and a tiny
    FID classifier (``monkeypatch``: pytest's); checks that it succeeded with finite losses, and returns its history."""
    import json
    import math

    from scoredistill.cli import main
    from scoredistill.images import metrics
    from scoredistill.images.training import ENV_DIGITS_TEACHER

    monkeypatch.setenv(ENV_DIGITS_TEACHER, str(teacher_folder))
    monkeypatch.setattr(metrics, "CLASSIFIER_SETTINGS", tiny_classifier_settings())
    monkeypatch.setattr(metrics, "inception_dir", lambda: None)
    sets = TINY_TEACHER_OVERRIDES + ["train.steps=2", "train.batch_size=8", "train.fake_score_warmup_steps=1",
                                     "eval.num_samples=40", "runtime.progress=false", "train.fake_updates_per_step=1", *extra]
    assert main(["run", method, "--preset", "digits", "--out", str(out), "--quiet", *[a for s in sets for a in ("--set", s)]]) == 0
    history = json.loads((Path(out) / "history.json").read_text())
    assert history and all(math.isfinite(v) for v in history[-1].values())
    return history
