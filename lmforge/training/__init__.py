"""What training needs whatever the task: the Lightning data module and curves, the Trainer and its
callbacks, exact resume, and the hardware checks."""
