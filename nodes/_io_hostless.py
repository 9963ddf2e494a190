"""The part of ComfyUI's V3 node API (``comfy_api.latest.IO``) this pack uses, for running without
ComfyUI (tests, CI, the workflow builder). Same names, same arguments, and the same V1 node info
(``GET_NODE_INFO_V1``, ``INPUT_TYPES``, ``RETURN_TYPES`` ...) as ComfyUI 0.33.0 derives from a schema:
tests/test_comfyui_server.py compares it with the real server's ``/object_info``.

Inside ComfyUI the nodes use the host's own module (see ``nodes/_io.py``); this file is never used there.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Optional


def _prune(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


class _classproperty:
    def __init__(self, f):
        self.f = f

    def __get__(self, obj, owner):
        return self.f(owner)


# ------------------------------------------------------------------------------ inputs / outputs
class Input:
    Parent: Any = None

    def __init__(self, id: str, display_name: str = None, optional: bool = False, tooltip: str = None,
                 lazy: bool = None, extra_dict: dict = None, raw_link: bool = None, advanced: bool = None):
        self.id, self.display_name, self.optional, self.tooltip = id, display_name, optional, tooltip
        self.lazy, self.extra_dict, self.rawLink, self.advanced = lazy, dict(extra_dict or {}), raw_link, advanced

    @property
    def io_type(self) -> str:
        return self.Parent.io_type

    def get_io_type(self) -> str:
        return self.io_type

    def as_dict(self) -> dict:
        return _prune({"display_name": self.display_name, "optional": self.optional, "tooltip": self.tooltip,
                       "lazy": self.lazy, "rawLink": self.rawLink, "advanced": self.advanced}) | _prune(self.extra_dict)


class WidgetInput(Input):
    def __init__(self, id: str, display_name: str = None, optional: bool = False, tooltip: str = None,
                 lazy: bool = None, default: Any = None, socketless: bool = None, widget_type: str = None,
                 force_input: bool = None, extra_dict: dict = None, raw_link: bool = None, advanced: bool = None):
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict, raw_link, advanced)
        self.default, self.socketless, self.widget_type, self.force_input = default, socketless, widget_type, force_input

    def as_dict(self) -> dict:
        return super().as_dict() | _prune({"default": self.default, "socketless": self.socketless,
                                           "widgetType": self.widget_type, "forceInput": self.force_input})

    def get_io_type(self) -> str:
        return self.widget_type if self.widget_type is not None else super().get_io_type()


class Output:
    Parent: Any = None

    def __init__(self, id: str = None, display_name: str = None, tooltip: str = None, is_output_list: bool = False):
        self.id = id
        self.display_name = display_name if display_name else id
        self.tooltip = tooltip
        self.is_output_list = is_output_list

    @property
    def io_type(self) -> str:
        return self.Parent.io_type


def _comfy_type(io_type: str, input_base=Input, output_base=Output, name: Optional[str] = None):
    """A ComfyType: a class with ``io_type`` and nested ``Input`` / ``Output`` bound to it."""
    typ = type(name or io_type.title(), (), {"io_type": io_type})
    typ.Input = type("Input", (input_base,), {"Parent": typ})
    typ.Output = type("Output", (output_base,), {"Parent": typ})
    return typ


class _IntInput(WidgetInput):
    def __init__(self, id: str, display_name: str = None, optional: bool = False, tooltip: str = None,
                 lazy: bool = None, default: int = None, min: int = None, max: int = None, step: int = None,
                 control_after_generate: bool = None, display_mode=None, socketless: bool = None,
                 force_input: bool = None, extra_dict: dict = None, raw_link: bool = None, advanced: bool = None):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                         extra_dict, raw_link, advanced)
        self.min, self.max, self.step = min, max, step
        self.control_after_generate, self.display_mode = control_after_generate, display_mode

    def as_dict(self) -> dict:
        display = getattr(self.display_mode, "value", self.display_mode)
        return super().as_dict() | _prune({"min": self.min, "max": self.max, "step": self.step,
                                           "control_after_generate": self.control_after_generate,
                                           "display": display})


class _FloatInput(WidgetInput):
    def __init__(self, id: str, display_name: str = None, optional: bool = False, tooltip: str = None,
                 lazy: bool = None, default: float = None, min: float = None, max: float = None,
                 step: float = None, round: float = None, display_mode=None, gradient_stops: list = None,
                 socketless: bool = None, force_input: bool = None, extra_dict: dict = None, raw_link: bool = None,
                 advanced: bool = None):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                         extra_dict, raw_link, advanced)
        self.min, self.max, self.step, self.round = min, max, step, round
        self.display_mode, self.gradient_stops = display_mode, gradient_stops

    def as_dict(self) -> dict:
        return super().as_dict() | _prune({"min": self.min, "max": self.max, "step": self.step, "round": self.round,
                                           "display": self.display_mode, "gradient_stops": self.gradient_stops})


class _StringInput(WidgetInput):
    def __init__(self, id: str, display_name: str = None, optional: bool = False, tooltip: str = None,
                 lazy: bool = None, multiline: bool = False, placeholder: str = None, default: str = None,
                 dynamic_prompts: bool = None, socketless: bool = None, force_input: bool = None,
                 extra_dict: dict = None, raw_link: bool = None, advanced: bool = None):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                         extra_dict, raw_link, advanced)
        self.multiline, self.placeholder, self.dynamic_prompts = multiline, placeholder, dynamic_prompts

    def as_dict(self) -> dict:
        return super().as_dict() | _prune({"multiline": self.multiline, "placeholder": self.placeholder,
                                           "dynamicPrompts": self.dynamic_prompts})


class _BooleanInput(WidgetInput):
    def __init__(self, id: str, display_name: str = None, optional: bool = False, tooltip: str = None,
                 lazy: bool = None, default: bool = None, label_on: str = None, label_off: str = None,
                 socketless: bool = None, force_input: bool = None, extra_dict: dict = None, raw_link: bool = None,
                 advanced: bool = None):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                         extra_dict, raw_link, advanced)
        self.label_on, self.label_off = label_on, label_off

    def as_dict(self) -> dict:
        return super().as_dict() | _prune({"label_on": self.label_on, "label_off": self.label_off})


class _ComboInput(WidgetInput):
    def __init__(self, id: str, options: list = None, display_name: str = None, optional: bool = False,
                 tooltip: str = None, lazy: bool = None, default: Any = None, control_after_generate: bool = None,
                 upload=None, image_folder=None, remote=None, socketless: bool = None, extra_dict: dict = None,
                 raw_link: bool = None, advanced: bool = None):
        if isinstance(options, type) and issubclass(options, Enum):
            options = [v.value for v in options]
        if isinstance(default, Enum):
            default = default.value
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, None, extra_dict,
                         raw_link, advanced)
        self.multiselect, self.options, self.control_after_generate = False, options, control_after_generate
        if upload is not None or image_folder is not None or remote is not None:
            raise NotImplementedError("the hostless IO has no upload/image_folder/remote combos")

    def as_dict(self) -> dict:
        return super().as_dict() | _prune({"multiselect": self.multiselect, "options": self.options,
                                           "control_after_generate": self.control_after_generate})


Boolean = _comfy_type("BOOLEAN", _BooleanInput, name="Boolean")
Int = _comfy_type("INT", _IntInput, name="Int")
Float = _comfy_type("FLOAT", _FloatInput, name="Float")
String = _comfy_type("STRING", _StringInput, name="String")
Combo = _comfy_type("COMBO", _ComboInput, name="Combo")
Image = _comfy_type("IMAGE", name="Image")
Mask = _comfy_type("MASK", name="Mask")
Latent = _comfy_type("LATENT", name="Latent")
Conditioning = _comfy_type("CONDITIONING", name="Conditioning")
Model = _comfy_type("MODEL", name="Model")
Vae = _comfy_type("VAE", name="Vae")
ClipVision = _comfy_type("CLIP_VISION", name="ClipVision")
Mesh = _comfy_type("MESH", name="Mesh")
Voxel = _comfy_type("VOXEL", name="Voxel")


def Custom(io_type: str):
    """A ComfyType for a custom socket type."""
    return _comfy_type(io_type, name="CustomComfyType")


# ------------------------------------------------------------------------------ hidden inputs
class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"


class HiddenHolder:
    """``cls.hidden`` of a node while it runs: the hidden values, None for any not given."""

    def __init__(self, values: Optional[dict] = None):
        values = values or {}
        for h in Hidden:
            setattr(self, h.name, values.get(h.value))

    def __getattr__(self, key: str):
        return None


# ------------------------------------------------------------------------------ schema and node
@dataclass
class NodeInfoV1:
    input: dict
    input_order: dict
    is_input_list: bool
    output: list
    output_is_list: list
    output_name: list
    output_tooltips: list
    output_matchtypes: Any
    name: str
    display_name: str
    category: str
    description: str
    output_node: bool
    has_intermediate_output: bool
    deprecated: bool
    experimental: bool
    dev_only: bool
    api_node: bool
    python_module: str
    price_badge: Any
    search_aliases: Any
    essentials_category: Any


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    search_aliases: list = field(default_factory=list)
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_dev_only: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    essentials_category: Optional[str] = None
    has_intermediate_output: bool = False

    def validate(self) -> None:
        for kind, ids in (("Input", [i.id for i in self.inputs]), ("Output", [o.id for o in self.outputs])):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            if dup:
                raise ValueError(f"{kind} ids must be unique, but {dup} are not.")

    def finalize(self) -> None:
        if self.is_output_node:
            for h in (Hidden.prompt, Hidden.extra_pnginfo):
                if h not in self.hidden:
                    self.hidden.append(h)
        for i, out in enumerate(self.outputs):
            if out.id is None:
                out.id = f"_{i}_{out.io_type}_"

    def get_v1_info(self, cls) -> NodeInfoV1:
        inputs: dict = {"required": {}}
        for i in self.inputs:
            d = i.as_dict()
            d.pop("optional", None)
            inputs.setdefault("optional" if i.optional else "required", {})[i.id] = (i.get_io_type(), d)
        for h in self.hidden:
            inputs.setdefault("hidden", {})[h.name] = (h.value,)
        return NodeInfoV1(
            input=inputs, input_order={k: list(v) for k, v in inputs.items()}, is_input_list=self.is_input_list,
            output=[o.io_type for o in self.outputs], output_is_list=[o.is_output_list for o in self.outputs],
            output_name=[o.display_name or o.io_type for o in self.outputs],
            output_tooltips=[o.tooltip or None for o in self.outputs], output_matchtypes=None,
            name=self.node_id, display_name=self.display_name, category=self.category,
            description=self.description, output_node=self.is_output_node,
            has_intermediate_output=self.has_intermediate_output, deprecated=self.is_deprecated,
            experimental=self.is_experimental, dev_only=self.is_dev_only, api_node=self.is_api_node,
            python_module=getattr(cls, "RELATIVE_PYTHON_MODULE", None) or "nodes", price_badge=None,
            search_aliases=self.search_aliases or None, essentials_category=self.essentials_category)


class NodeOutput:
    """A node's result: ``args`` (one per output) and an optional ``ui`` dict."""

    def __init__(self, *args: Any, ui: Any = None, expand: Any = None, block_execution: Any = None):
        self.args, self.ui, self.expand, self.block_execution = args, ui, expand, block_execution

    @property
    def result(self):
        return self.args if self.args else None

    def __getitem__(self, index):
        return self.args[index]


class ComfyNode:
    """Base of a V3 node: ``define_schema()`` and ``execute(**inputs)`` classmethods."""

    RELATIVE_PYTHON_MODULE = None
    hidden: Optional[HiddenHolder] = None

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError

    @classmethod
    def GET_SCHEMA(cls) -> Schema:
        schema = cls.define_schema()
        schema.finalize()
        schema.validate()
        return schema

    @classmethod
    def GET_NODE_INFO_V1(cls) -> dict:
        return asdict(cls.GET_SCHEMA().get_v1_info(cls))

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return cls.GET_NODE_INFO_V1()["input"]

    @classmethod
    def PREPARE_CLASS_CLONE(cls, v3_data: Optional[dict]):
        """A subclass whose ``hidden`` holds ``v3_data["hidden_inputs"]`` (as ComfyUI does per run)."""
        return type(f"{cls.__name__}Clone", (cls,), {"hidden": HiddenHolder((v3_data or {}).get("hidden_inputs"))})

    @_classproperty
    def DESCRIPTION(cls):  # noqa: N802
        return cls.GET_SCHEMA().description

    @_classproperty
    def CATEGORY(cls):  # noqa: N802
        return cls.GET_SCHEMA().category

    @_classproperty
    def OUTPUT_NODE(cls):  # noqa: N802
        return cls.GET_SCHEMA().is_output_node

    @_classproperty
    def RETURN_TYPES(cls):  # noqa: N802
        return cls.GET_NODE_INFO_V1()["output"]

    @_classproperty
    def RETURN_NAMES(cls):  # noqa: N802
        return cls.GET_NODE_INFO_V1()["output_name"]

    @_classproperty
    def OUTPUT_TOOLTIPS(cls):  # noqa: N802
        return cls.GET_NODE_INFO_V1()["output_tooltips"]


class ComfyExtension:
    async def on_load(self) -> None:
        return None

    async def get_node_list(self) -> list:
        raise NotImplementedError
