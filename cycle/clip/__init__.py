"""CLIP: the model factory, checkpoint format and training module (model), HF conversion (convert),
exports (export), and the trainer: `train.train_clip` (entry: checks, then ranks) -> `trainer.Trainer`
(state and loop) over `loss`, `text`, `augment`, `optim`, `checkpoint`, `dist`."""
