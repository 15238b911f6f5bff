"""surgery: declarative model surgery for PyTorch.

    import surgery
    result = surgery.apply("bcosify-resnet", "timm:resnet18")   # a shipped recipe, a timm model
    surgery.save(result, "out/resnet18-bcos")
    again = surgery.load("out/resnet18-bcos")

Everything the ``surgery`` command does is one call away here.
"""

from surgery.apply import Result, apply
from surgery.artifacts import load, save
from surgery.errors import ArtifactError, ModelRefError, RecipeError, SurgeryError, UserError
from surgery.lang.checker import CheckedRecipe, check
from surgery.lang.formatter import format_recipe
from surgery.lang.parser import parse, parse_file
from surgery.models import load_model
from surgery.plan import Plan, plan
from surgery.registry import register_constructor, register_encoding, register_group, register_layer

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "CheckedRecipe",
    "ModelRefError",
    "Plan",
    "RecipeError",
    "Result",
    "SurgeryError",
    "UserError",
    "__version__",
    "apply",
    "check",
    "format_recipe",
    "load",
    "load_model",
    "parse",
    "parse_file",
    "plan",
    "register_constructor",
    "register_encoding",
    "register_group",
    "register_layer",
    "save",
]
