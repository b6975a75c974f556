"""`datasets` builders for the two Kaggle bone radiograph downloads, one sub-package per dataset."""
