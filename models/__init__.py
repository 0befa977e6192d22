"""Networks and training-time modules: SongUNet, EMA copies, EDM augmentation."""
