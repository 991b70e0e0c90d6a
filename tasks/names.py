"""The names a setting may take, defined once: the config's choices, the CLI's and the UI
form's, and the stages' lookups all read them here. Standard library only: the command line
checks its flags with them before it loads torch."""

SYNTHETIC = "synthetic"  # the data source that is the seed's generated data, not a file

BUILTIN_MODELS = ("linear", "mlp")
MODEL_ENTRY_POINTS = "trainflow.models"  # the entry-point group of plugin models
ACTIVATIONS = ("relu", "tanh", "gelu", "silu")

OPTIMIZERS = ("sgd", "adam", "adamw")
LOSSES = ("mse", "l1", "huber", "cross_entropy", "bce_with_logits")
# The dtypes an array file's x is kept in, as stored (tasks/data/tensors.py), by name as
# spec.json writes them; the model's front casts them per batch (tasks/engine/models.py).
STORED_X_DTYPES = ("float32", "float16", "bfloat16", "uint8", "int8", "int16", "int32", "int64")
# Per-batch training augmentations on the device (tasks/engine/augment.py): a random crop of
# the zero-padded image, a horizontal flip.
AUGMENTATIONS = ("crop", "flip")

# A torch device by name, checked alike for training and prediction: by the config, and as a
# JSON-schema pattern by the Prefect server before a deployment run exists.
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"
DEVICE_CHOICES = "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
