"""Training stage: DeepSpeed training of the MotionCharacter adapter (paper sec. 3.4, 4.1).

  settings    TrainConfig (defaults in motioncharacter/configs/train.yaml)
  data        ManifestDataset + StepBatchSampler: the prepared manifest as training batches
  trainer     the DeepSpeed loop: losses (eq. 9-11), MLflow, checkpoints, resume, signals
  checkpoint  checkpoint layout on a local folder or s3://
  cli         ``motioncharacter train``
"""
