"""Model families with per-layer SSM state sizes. Each subfolder is one Hugging Face model unit (configuration +
modeling + the files they import), copied as a whole next to saved weights as remote code."""
