"""The MotionCharacter network on diffusers (paper sec. 3.2-3.3).

Modules (imported lazily; nothing heavy is loaded by importing this package):
  inference      load_pipeline(...), generate(...): the stable entry points
  pipeline       MotionCharacterPipeline (an AnimateDiffPipeline) with check_inputs
  adapter        MotionCharacterAdapter (ModelMixin): every trainable weight, attach(unet)
  attention      MotionCharacterAttnProcessor, MCConditioning (eq. 3 and 8)
  id_module      IDEncoder (eq. 2), prepare_reference
  motion_module  IntensityEncoder (E_M), validate_intensity
  losses         region-aware (eq. 9-10), ID-consistency (eq. 4), total (eq. 11)
  loading        diffusers-layout weights from a folder or s3://, adapter save/load, pickle guard
  presets        the ``tiny`` preset, the offline CLIP tokenizer, save_tiny_weights
  cli            ``motioncharacter generate``
"""
