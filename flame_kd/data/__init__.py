"""The data layer: frames CSV contract, FLAME2 label ranges, video-aware split, paired dataset, cache.

Modules (import them directly; this package imports nothing so `flame-kd data check` stays fast):
`frames` (frame ids, path resolution), `schema` (load/check/digest a frames CSV), `checks` (what check
decodes and compares: images, RGB vs IR, labels vs ranges), `labels` (label ranges, `data prepare`),
`split` (video-aware split; `blocks` assigns its blocks), `synth` (synthetic FLAME2-like data),
`dataset` (decoded-frame cache, paired dataset, DataLoader).
"""
