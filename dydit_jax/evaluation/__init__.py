"""Sample-quality metrics of the ADM evaluator (FID, sFID, Inception Score, precision/recall).

- `inception`: the FID Inception-v3 in Flax and its (local, converted once) weights;
- `fid`: Gaussian feature statistics and the Frechet distance (FID on pool_3, sFID on
  mixed_6/conv);
- `inception_score`, `precision_recall`: the other two metrics;
- `reference_batch`: ADM `.npz` batches (`arr_0` images, stored mu/sigma/mu_s/sigma_s);
- `evaluator`: features of image batches, then all metrics (`evaluate_npz`);
- `i3d`, `fvd`: the Kinetics-400 I3D in Flax and FVD of uint8 clips (`extract_video_features`);
- `video_metrics`: FVD and per-frame FID of generated clips against reference clips.
"""
