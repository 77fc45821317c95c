"""The base configuration every file in `configs/` starts from.

It lives inside the package (not in `configs/`) so that a config file loaded by
path (`--config=/any/where/openkbp.py`) can import it from an installed
package. Every choice docs/design.md describes where the paper is silent is a field here.
"""

import ml_collections


class ConfigError(ValueError):
  """A config field or flag value that cannot work; the message names it."""


# Table 2a of the paper: which modules each ablation row switches on.
ABLATION_ROWS = {
    1: dict(
        use_msfe=False, use_csa=False, use_pi=False, use_af=False
    ),  # plain U-Net
    2: dict(use_msfe=True, use_csa=False, use_pi=False, use_af=False),  # + MSFE
    3: dict(
        use_msfe=True, use_csa=True, use_pi=False, use_af=False
    ),  # + CSA (MSCSA)
    4: dict(use_msfe=True, use_csa=True, use_pi=True, use_af=False),  # + PI
    5: dict(
        use_msfe=True, use_csa=True, use_pi=True, use_af=True
    ),  # + AF = RANDose
}

# Table 2b of the paper: which region terms the loss has.
LOSS_ROWS = {
    1: ("",),  # L1 only
    2: ("ptv",),  # L1 + PTV
    3: ("ptv", "oar"),  # L1 + PTV + OAR
}


def get_default_config() -> ml_collections.ConfigDict:
  """The paper's recipe on OpenKBP (docs/design.md sections 2 to 5)."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # ---------------------------------------------------------------- data
  config.data = data = ml_collections.ConfigDict()
  # An OpenKBP `provided-data` folder holding train-pats/ and validation-pats/.
  data.root = ""
  data.train_split = "train-pats"
  data.eval_split = "validation-pats"
  # When set, `num_synthetic_*` phantom patients are written under
  # <workdir>/synthetic and used instead of `root` (the embedded default).
  data.synthetic = False
  data.num_synthetic_train = 16
  data.num_synthetic_eval = 4
  data.synthetic_grid = 128  # phantom grid edge (voxels) written on disk
  # Where the encoded cache lives; "" means <workdir>/cache.
  data.cache_dir = ""
  # Integer factor the 128^3 grid is reduced by before training (1 = full
  # size). Predictions are brought back to the patient's own grid.
  data.downsample = 1
  # Crop training: each example is a random crop of this shape (training
  # grid voxels, each divisible by 2^(S-1)) placed around the possible-dose
  # mask, after augmentation; prediction then covers the mask's bounding box
  # with overlapping windows of the same shape, blended (Gaussian weights).
  # () = the whole grid (the paper). The mask's box averages 60 x 91 x 81
  # voxels of the 128^3 grid, so a crop near that size sees the patient at
  # full resolution for the cost of a 64^3 grid.
  data.crop_shape = ()
  # Along an axis where the mask is longer than the crop: the crop lies
  # inside the mask's box (inside) or its centre is uniform in the box
  # (centre: the box's ends are sampled more often).
  data.crop_placement = "inside"
  data.window_overlap = 0.5  # fraction of a window shared with the next
  # Progressive resizing: the first `coarse_steps` training steps see the
  # whole grid reduced by `coarse_downsample` (the 128^3 grid at 2: 64^3,
  # the patient's whole extent at half the resolution), the rest the
  # training grid above (downsample, crop_shape). The network is fully
  # convolutional and the geometry channels are in mm, so the same
  # parameters carry over. 0 = off (the paper).
  data.coarse_steps = 0
  data.coarse_downsample = 2
  # Input encoding (docs/design.md section 2).
  data.ct_clip = (-1024.0, 1500.0)  # HU
  data.ct_scale = 1000.0  # HU per unit
  data.dose_scale = 70.0  # Gy per target unit (the PTV70 prescription)
  data.ptv_values = (0.8, 0.9, 1.0)  # PTV56, PTV63, PTV70 input levels
  # An extra input `geom`: each voxel's signed distance to PTV56, PTV63 and
  # PTV70 (randose_jax/data/distances.py), in units of geometry_scale_mm.
  data.geometry = False
  data.geometry_scale_mm = 50.0
  # With geometry: three more channels, each voxel's superior/inferior
  # distance to each PTV's slab of axial slices (coplanar beams).
  data.geometry_slab = False
  # Geometry-consistent augmentation (docs/design.md section 1); training only.
  data.augment = True
  data.flip_lr = True
  data.swap_parotids = True
  data.flip_si = True
  data.rotate = True  # multiples of 40 degrees about axis 2
  # grain: multiprocess prefetch workers (0 = in-process; tests use 0).
  data.num_workers = 2
  data.worker_buffer_size = 2
  # grain reader threads per process (in each worker, or in the main process
  # when num_workers = 0); each reads ahead batch_size examples (~90 MB each
  # at 128^3), so keep it small.
  data.read_threads = 1

  # --------------------------------------------------------------- model
  config.model = model = ml_collections.ConfigDict()
  model.name = "randose"
  model.use_msfe = True
  model.use_csa = True
  model.use_pi = True
  model.use_af = True
  model.widths = (16, 32, 64, 128, 256)  # one per stage; S = len(widths)
  model.msfe_kernels = (3, 5, 7)
  model.pi_kernels = (3, 5, 7)
  # How PI brings F_P to a stage's grid: avgpool (by the stage factor 2^(s-1))
  # | linear (jax.image.resize, anti-aliased trilinear).
  model.pi_resize = "avgpool"
  model.msfe_fused = False  # compute MSFE as one conv with summed kernels
  # How the k^3 convs (stem, MSFE, PI, plain blocks) are computed; same params
  # and math either way: direct (lax conv) | fft (frequency domain, whole grid
  # or overlap-save tiles, one FFT per input shared by MSFE's branches and
  # PI's kernels) | auto (per layer, the cheaper of direct and FFT by a cost
  # estimate on the CPU backend, where XLA's direct 3D conv runs at a few to
  # ~100 GFLOP/s; direct on GPU/TPU). benchmarks/NOTES.md has the measurements.
  model.conv_impl = "auto"
  model.stem_kernel = 3
  model.blocks_per_stage = 1
  model.csa_reduction = 4
  model.alpha_init = 1.0  # CSA: F_CA + alpha * F_SA
  model.beta_init = 1.0  # AF: F_E^A + beta * F_D^A
  model.norm = "instance"  # instance | group (batch-free GroupNorm) | none
  model.norm_groups = 8  # norm="group": gcd(norm_groups, channels) groups
  model.activation = "relu"
  model.down = "maxpool"  # maxpool | conv (2x2x2 stride 2)
  model.up = "transpose"  # transpose | resize (trilinear + 1x1x1 conv)
  model.dtype = "float32"  # float32 | bfloat16 (compute); params stay float32
  model.remat = False
  # Initial kernel of the 1x1x1 head: zeros (every prediction starts at 0 Gy,
  # the dose of most voxels) | lecun (flax's default). With lecun, the first
  # steps can park the full RANDose in a state that predicts ~0 inside the
  # targets for hundreds of steps (benchmarks/NOTES.md, "Why the full RANDose
  # learned slowly on real data"); zeros avoided it in every run measured.
  model.head_init = "zeros"

  # ---------------------------------------------------------------- loss
  config.loss = loss = ml_collections.ConfigDict()
  # Table 2b row 3; "mask" (the possible-dose mask as a third learned-weight
  # region) is this library's addition, off in the paper's config.
  loss.regions = ("ptv", "oar")
  # "uncertainty": exp(-s_r) * L1_r + s_r, s_r learned in the parameter tree.
  # "fixed": constant weights below.
  loss.mode = "uncertainty"
  loss.init_log_var = 0.0
  loss.fixed_weights = (1.0, 1.0)  # (w_PTV, w_OAR[, w_mask]) in "fixed" mode

  # ---------------------------------------------------------- training
  config.optimizer = "adam"  # adam | adamw | sgd
  config.learning_rate = 1e-4
  config.lr_schedule = "constant"  # constant | cosine
  config.warmup_steps = 0
  # "cosine" only: hold the rate constant until this step, then decay to 0
  # at num_train_steps (e.g. a long constant-rate run resumed for its
  # decay). 0 = decay right after the warm-up.
  config.lr_decay_start = 0
  config.grad_clip_norm = 0.0  # 0 = no clipping
  # Exponential moving average of the model parameters (not the loss's
  # region weights), updated every step: ema = d * ema + (1 - d) * params,
  # starting from the initial parameters, with d = min(ema_decay, (1 + t) /
  # (10 + t)) at step t (so early steps are not dominated by the initial
  # weights). When on, the validations (scores, best checkpoint), predict
  # and export use the EMA; it is saved with the checkpoints. 0 = off (the
  # paper's recipe); e.g. 0.999. Must be in [0, 1).
  config.ema_decay = 0.0
  config.batch_size = 2  # global, over all devices and hosts
  config.num_train_steps = 80_000
  config.log_every_steps = 50
  config.eval_every_steps = 2_000
  config.checkpoint_every_steps = 1_000
  config.keep_checkpoints = (
      3  # latest N, plus the best by validation dose score
  )
  config.eval_tta = False  # 4-flip test-time augmentation at prediction
  config.max_eval_patients = 0  # 0 = all validation patients
  # A live bar of the steps on stderr; the cache build's patients too (a
  # live line on a terminal, one line per patient elsewhere). False: neither.
  config.progress_bar = True
  # Resume order: a checkpoint in the workdir wins, then this one, then scratch.
  config.init_checkpoint = ""  # a workdir or a checkpoint step folder
  return config
