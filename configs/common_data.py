"""The data section shared by all configs: `c.data = data_config(...)` (radfm_jax.data.pipeline reads it).

Defaults are RadFM's published input settings; configs override what they need, e.g. the demo:
  data_config(store="runs/demo/store", tokenizer="runs/demo/tok.model", image_hw_2d=(64, 64),
              image_hw_3d=(64, 64), depth_buckets=(8,), max_len=128)

Static shapes: a run compiles at most
  (1 + len(depth_buckets)) x len(slot_buckets) x len(len_buckets)
distinct batch shapes (2D grid or a 3D depth bucket x image slots x text length); RadFM defaults with
the buckets below: 17 x 4 x 3 = 204 at most, far fewer in practice (only groups present in the data).
Use fewer depth buckets (e.g. (16, 32, 64)) to bound compilation on big runs.
"""
import ml_collections


def data_config(**overrides) -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  # -- what to read ---------------------------------------------------------------------------------
  d.store = ""                 # store root (local path or a TensorStore kvstore URL, e.g. gs://...)
  d.mix = None                 # [{"name", "store", "weight"}, ...] (configs/mixes.py); overrides store
  d.tasks = None               # restrict to these schema.TASKS (None = all)
  d.train_split = "train"
  d.eval_split = "val"
  d.tokenizer = ""             # SentencePiece .model (LLaMA's tokenizer.model or one trained here)
  d.upstream_image_position = False  # RadFM quirk: image blocks before the question's last character
  # -- batch shapes ---------------------------------------------------------------------------------
  d.batch_size = 8             # global batch of 2D (or text-only) rows, split over processes
  d.batch_size_3d = 8          # global batch of 3D rows (RadFM: 4 per device 2D, 1 per device 3D)
  d.max_len = 2048             # longest token sequence (RadFM: 2048)
  d.len_buckets = (512, 1024, 2048)  # padded text lengths; max_len is always one
  d.slot_buckets = (1, 2, 4)   # image slots per row; model.max_images is always one
  d.pack = False               # pack several samples per row (segment ids, positions restart)
  d.pack_max_samples = 8
  # -- images (radfm_jax.data.preprocess.ImageSpec) -------------------------------------------------
  d.image_hw_2d = (512, 512)
  d.depth_2d = 4
  d.image_hw_3d = (256, 256)
  d.depth_buckets = tuple(range(4, 65, 4))
  d.intensity = "radfm"        # radfm | minmax | window:NAME | window:CENTER,WIDTH
  d.interpolation_2d = "cubic"
  d.interpolation_3d = "nearest"
  d.crop_scale = (0.8, 1.0)    # train-time random resized crop (2D; 3D too when crop_3d)
  d.crop_3d = False
  d.image_channels = 1         # host channels: 1 gray (replicated on device; colour -> luma) | 3
  d.image_dtype = "float32"    # host/transport dtype: float32 | uint16 (lossless for bf16; half the bytes) | uint8
  # -- execution ------------------------------------------------------------------------------------
  d.workers = 2                # Grain worker processes (0 = in the main process)
  d.worker_buffer = 2          # batches buffered per worker
  d.read_threads = 2           # threads per worker building batches
  d.prefetch = 2               # batches prefetched by those threads
  d.on_corrupt = "skip"        # skip | fail: an unreadable volume at training time
  for k, v in overrides.items():
    d[k] = v
  return d


# MedMD pre-training and RadMD fine-tuning mixtures: see configs/mixes.py.
