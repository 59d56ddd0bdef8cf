"""The multi-resolution diffusion process of MDM: schedules, the nested training loss, samplers.

Public API (all names importable from ``mdm_fast.diffusion``)
-------------------------------------------------------------
Configs (``config.py``; field names and defaults are the public ml-mdm ones)::

    ScheduleType   COSINE | DDPM | DEEPFLOYD | SIGMOID          (strings accepted, any case)
    PredictionType DDPM | DDIM (both: epsilon) | V_PREDICTION | X0
    ThresholdType  NONE | CLIP | DYNAMIC | DYNAMIC_IF
    XType.parse(value) -> XType                                  (ValueError listing valid names)
    SamplerConfig(num_diffusion_steps=32, reproject_signal=False, schedule_type=DDPM,
                  prediction_type=DDPM, loss_target_type=None (-> prediction_type),
                  beta_start=1e-4, beta_end=0.02, threshold_function=CLIP, rescale_schedule=1.0,
                  rescale_signal=None, schedule_shifted=False, schedule_shifted_power=1.0)
    DiffusionConfig(sampler_config=SamplerConfig(), model_output_scale=0.0, use_vdm_loss_weights=True)
    NestedDiffusionConfig(DiffusionConfig fields..., use_double_loss=False, multi_res_weights=None
                  ("16:4:1"), no_use_residual=False, use_random_interp=False, mixed_ratio=None ("2:1"),
                  random_downsample=False, average_downsample=False, mid_downsample=False)
    Cls.from_dict(d) -> Cls        ValueError naming any unknown field or bad value; nested
                                   ``sampler_config`` may be a dict. ``cfg.to_dict()`` -> plain dict.

Schedules (``schedules.py``; float32 tables bit-identical to the public sampler's)::

    gamma_table(config: SamplerConfig) -> torch.Tensor (N+1,) float32, after rescale_schedule
    shift_gammas(gammas, ratio, power=1.0) -> gammas with SNR / ratio**power (ratio <= 1: unchanged)
    vdm_loss_weights(gammas) -> (N+1,)
    LevelSchedule(config: SamplerConfig, scales: list[int])
        .gammas (L, N+1) float32 per-level table; .signal_scales list[float]; .vdm_weights (N+1,)
        scales = model.nest_ratio + [1] (size of each level / size of the lowest); [1] for a UNet

The process (``process.py``)::

    NestedDiffusion(config: DiffusionConfig | NestedDiffusionConfig, nest_ratio=(), is_temporal=(),
                    frames_per_side=4)
    NestedDiffusion.for_model(config, model)       # reads model.nest_ratio / .is_temporal / .frames_per_side()
      .num_levels, .scales, .ratios (top size / level size), .schedule (LevelSchedule)
      .loss(model, images, conditioning, cond_mask, micros=None, times=None, generator=None)
            -> (loss: scalar tensor, stats: dict[str, Tensor])   # stats: "loss_level{i}" (detached
               per-level mean), "times" (B,); loss already VDM-weighted/averaged as the public
               trainer does; images (B, C, H, W) in [-1, 1] at the top resolution
      .pyramid(images, times, generator=None) -> (x0 list, x_t list, target list, noise list)
      .predict(model, x_t_list, model_times, conditioning, cond_mask, micros=None) -> list[Tensor]
            # model call + output scale + residual-from-low-resolution; works for a plain UNet too
      .make_denoise(model, conditioning, cond_mask, guidance_scale=1.0, micros=None,
                    uncond_conditioning=None, uncond_mask=None, autocast=None) -> denoise callable
      .sampler(num_inference_steps=None, ddim_eta=None, threshold=None) -> Sampler
      .sample(model, conditioning, cond_mask, image_size, **sampler/denoise kwargs) -> list[Tensor]

Samplers (``sampler.py``)::

    denoise(x_t_list: list[Tensor], model_times: Tensor (B,) int64) -> list[Tensor] predictions
    make_denoise(diffusion, model, conditioning, cond_mask, guidance_scale=1.0, micros=None,
                 uncond_conditioning=None, uncond_mask=None, autocast=None)
        CFG as the public code: batch doubled, [uncond; cond]; with uncond_conditioning=None and
        guidance_scale != 1 the conditioning must already hold 2B rows in that order. autocast: the
        model under torch.autocast to that dtype (e.g. torch.bfloat16) on weights cast once;
        guidance and the sampler update stay in x_t's dtype.
    inference_timesteps(num_diffusion_steps, num_inference_steps) -> list[int] (public spacing)
    Sampler(diffusion, num_inference_steps=None, ddim_eta=None (ancestral DDPM) | float (DDIM),
            threshold=None (config's threshold_function) | ThresholdType | str, impl="auto")
      .timesteps -> list[int]
      .initial_noise(batch, channels, image_size, generator=None, device=None) -> list[Tensor]
      .noised_start(images, t, generator=None) -> list[Tensor]   # partial diffusion start
      .steps(denoise, x_t_list, start_t=None, generator=None, step_fn=None) -> Iterator[SamplerStep]
            SamplerStep(t, s, x0: list, x_s: list)   (intermediates, level units); step_fn replaces
            .step (e.g. its CUDA-graph replay, mdm_fast.engine.GraphedCallable)
      .precompile(denoise, x_t_list)   # the Triton kernels of the first and last step, compiled up front
      .to_images(levels, clip=True) -> list[Tensor]   # level units -> image units in [-1, 1]
      .sample(denoise, x_t_list, start_t=None, generator=None) -> list[Tensor] in [-1, 1]
    tile_levels(levels: list[Tensor], mode="bilinear") -> (B, C, H, L*W) lowest level first

Fused ops (``mdm_fast.ops.diffusion_step``, backends ref/triton): ``noisy_pyramid`` and
``sampler_update``; their ``ref`` backends are the single copy of the formulas used here.
"""
from mdm_fast.diffusion.config import (  # noqa: F401
    DiffusionConfig,
    NestedDiffusionConfig,
    PredictionType,
    SamplerConfig,
    ScheduleType,
    ThresholdType,
)
from mdm_fast.diffusion.process import NestedDiffusion, prediction_kind  # noqa: F401
from mdm_fast.diffusion.sampler import Sampler, SamplerStep, inference_timesteps, make_denoise, tile_levels  # noqa: F401
from mdm_fast.diffusion.schedules import LevelSchedule, gamma_table, shift_gammas, vdm_loss_weights  # noqa: F401
