"""Evaluation on the Unsplash-50 protocol (MotionCharacter sec. 4.1, Table 1) plus intensity adherence.

- ``metrics``: the metric math as small pure functions (VBench dynamic degree and motion smoothness,
  cosine similarities, Spearman) and the "absent with a reason" result convention.
- ``models``: optional weights (CLIP via open_clip, RAFT, AMT / DOVER TorchScript exports).
- ``score``: every metric of one video.
- ``evalset``: portraits x prompt bank x actions x intensities, deterministic seeds.
- ``stage``: ``motioncharacter evaluate`` (generate, score, aggregate, plot, MLflow).
- ``compare``: side-by-side table of runs in the layout of the paper's Table 1.
"""
