"""jwst 3.0's names for Detector1 and its steps, and its parameter files.

streamdet's step names are jwst's step aliases (``jump``, ``ramp_fit``); this module
knows what jwst calls the rest: the step classes (whose ``pars-<class>`` CRDS parameter
references and ASDF parameter files name them), every parameter jwst 3.0's MIRI
Detector1 chain declares with its default, and the parameters stpipe gives every step.

A jwst parameter that a streamdet step does not implement is accepted at jwst's default
(the behaviour is then the same) and refused with a message naming it otherwise: never
silently ignored. The same holds for jwst steps streamdet does not have (``ipc``,
``persistence``...), except that skipping one is always accepted.

Parameter files are stpipe's ASDF ``StepConfig`` trees: ``class``, ``name``,
``parameters`` and, for a pipeline, ``steps`` (a list of such trees); the older layout
keeps ``class``/``name``/``steps`` inside ``parameters``. ``strun --save-parameters``,
``Step.export_config`` and CRDS ``pars-*`` references are all written this way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BadInputError

PIPELINE_CLASS = "jwst.pipeline.calwebb_detector1.Detector1Pipeline"
PIPELINE_NAME = "Detector1Pipeline"

#: step alias -> jwst 3.0 class, in Detector1Pipeline's order
STEP_CLASSES = {
    "group_scale": "jwst.group_scale.group_scale_step.GroupScaleStep",
    "dq_init": "jwst.dq_init.dq_init_step.DQInitStep",
    "emicorr": "jwst.emicorr.emicorr_step.EmiCorrStep",
    "saturation": "jwst.saturation.saturation_step.SaturationStep",
    "ipc": "jwst.ipc.ipc_step.IPCStep",
    "superbias": "jwst.superbias.superbias_step.SuperBiasStep",
    "refpix": "jwst.refpix.refpix_step.RefPixStep",
    "rscd": "jwst.rscd.rscd_step.RscdStep",
    "firstframe": "jwst.firstframe.firstframe_step.FirstFrameStep",
    "lastframe": "jwst.lastframe.lastframe_step.LastFrameStep",
    "linearity": "jwst.linearity.linearity_step.LinearityStep",
    "dark_current": "jwst.dark_current.dark_current_step.DarkCurrentStep",
    "reset": "jwst.reset.reset_step.ResetStep",
    "persistence": "jwst.persistence.persistence_step.PersistenceStep",
    "charge_migration": "jwst.charge_migration.charge_migration_step.ChargeMigrationStep",
    "jump": "jwst.jump.jump_step.JumpStep",
    "picture_frame": "jwst.picture_frame.picture_frame_step.PictureFrameStep",
    "clean_flicker_noise": "jwst.clean_flicker_noise.clean_flicker_noise_step.CleanFlickerNoiseStep",
    "ramp_fit": "jwst.ramp_fitting.ramp_fit_step.RampFitStep",
    "gain_scale": "jwst.gain_scale.gain_scale_step.GainScaleStep",
}

#: parameters stpipe gives every step and pipeline, with their defaults (where a step
#: writes its own output: streamdet writes only the final products)
COMMON = {
    "pre_hooks": [], "post_hooks": [], "output_file": None, "output_dir": None,
    "output_ext": ".fits", "output_use_model": False, "output_use_index": True,
    "save_results": False, "suffix": None, "search_output_file": True, "input_dir": "",
}

#: Detector1Pipeline's own parameters (besides COMMON)
PIPELINE_PARAMS = {"save_calibrated_ramp": False}

#: every parameter of jwst 3.0's Detector1 steps with its default (``skip`` included)
STEP_PARAMS: dict[str, dict[str, Any]] = {
    "group_scale": {"skip": False},
    "dq_init": {"skip": False, "user_supplied_dq": None},
    "emicorr": {"skip": True, "algorithm": "joint", "nints_to_phase": None, "nbins": None,
                "scale_reference": True, "onthefly_corr_freq": None, "use_n_cycles": 3,
                "fit_ints_separately": False, "user_supplied_reffile": None,
                "save_intermediate_results": False},
    "saturation": {"skip": False, "n_pix_grow_sat": 1, "use_readpatt": True},
    "ipc": {"skip": False},
    "superbias": {"skip": False},
    "refpix": {"skip": False, "odd_even_columns": True, "use_side_ref_pixels": True,
               "side_smoothing_length": 11, "side_gain": 1.0, "odd_even_rows": True,
               "ovr_corr_mitigation_ftr": 3.0, "preserve_irs2_refpix": False,
               "irs2_mean_subtraction": False, "refpix_algorithm": "median", "sigreject": 4.0,
               "gaussmooth": 1.0, "halfwidth": 30, "siglimit": 3.0},
    "rscd": {"skip": False},
    "firstframe": {"skip": True, "bright_use_group1": True},
    "lastframe": {"skip": False},
    "linearity": {"skip": False},
    "dark_current": {"skip": False, "dark_output": None, "average_dark_current": None},
    "reset": {"skip": False},
    "persistence": {"skip": True, "save_persistence": None, "persistence_time": None,
                    "dn_threshold": None, "persistence_array_file": None,
                    "persistence_dnu": False},
    "charge_migration": {"skip": True, "signal_threshold": 25000.0},
    "jump": {"skip": False, "rejection_threshold": 4.0, "three_group_rejection_threshold": 6.0,
             "four_group_rejection_threshold": 5.0, "maximum_cores": "1",
             "flag_4_neighbors": True, "max_jump_to_flag_neighbors": 1000.0,
             "min_jump_to_flag_neighbors": 10.0, "after_jump_flag_dn1": 0.0,
             "after_jump_flag_time1": 0.0, "after_jump_flag_dn2": 0.0,
             "after_jump_flag_time2": 0.0, "expand_large_events": False, "min_sat_area": 1.0,
             "min_jump_area": 5.0, "expand_factor": 2.0, "use_ellipses": False,
             "sat_required_snowball": True, "min_sat_radius_extend": 2.5, "sat_expand": 2,
             "edge_size": 25, "mask_snowball_core_next_int": True,
             "snowball_time_masked_next_int": 4000, "find_showers": False,
             "max_shower_amplitude": 4.0, "extend_snr_threshold": 1.2, "extend_min_area": 90,
             "extend_inner_radius": 1.0, "extend_outer_radius": 2.6,
             "extend_ellipse_expand_ratio": 1.1, "time_masked_after_shower": 15.0,
             "min_diffs_single_pass": 10, "max_extended_radius": 200, "minimum_groups": 3,
             "minimum_sigclip_groups": 100, "only_use_ints": True},
    "picture_frame": {"skip": True, "mask_science_regions": True, "n_sigma": 2.0,
                      "save_mask": False, "save_correction": False},
    "clean_flicker_noise": {"skip": True, "autoparam": False, "fit_method": "median",
                            "fit_by_channel": False, "background_method": "median",
                            "background_box_size": None, "mask_science_regions": False,
                            "apply_flat_field": False, "n_sigma": 2.0, "fit_histogram": False,
                            "single_mask": True, "user_mask": None, "save_mask": False,
                            "save_background": False, "save_noise": False},
    "ramp_fit": {"skip": False, "algorithm": "OLS_C", "int_name": "", "save_opt": False,
                 "opt_name": "", "suppress_one_group": True, "firstgroup": None,
                 "lastgroup": None, "maximum_cores": "1"},
    "gain_scale": {"skip": False},
}

#: parameters the engine serves for the steps that declare them in jwst: the processes'
#: thread count (``--threads``) rather than a step's own setting
ENGINE_PARAMS = {"maximum_cores": ("jump", "ramp_fit")}


def class_name(alias: str) -> str:
    """The jwst class name (``JumpStep``) of a step alias."""
    return STEP_CLASSES[alias].rsplit(".", 1)[1]


def pars_reftype(alias: str | None) -> str:
    """The CRDS parameter-reference type of a step alias (None: the pipeline)."""
    return "pars-" + (PIPELINE_NAME if alias is None else class_name(alias)).lower()


def alias_of(name: str) -> str | None:
    """The step alias for a jwst step name: the alias itself, a class name
    (``JumpStep``) or a fully qualified class; None when it is none of these."""
    if name in STEP_CLASSES:
        return name
    short = name.rsplit(".", 1)[-1]
    for alias, full in STEP_CLASSES.items():
        if short == full.rsplit(".", 1)[1]:
            return alias
    return None


_NONE_WORDS = {"none", "null", ""}


def same_value(value: Any, default: Any) -> bool:
    """Whether ``value`` (typed, or text from a command line) is jwst's ``default``."""
    if isinstance(value, str) and default is not None and not isinstance(default, str):
        text = value.strip()
        if isinstance(default, bool):
            return text.lower() in ({"true", "t", "yes", "y", "1"} if default
                                    else {"false", "f", "no", "n", "0"})
        if isinstance(default, list):
            return text in ("[]", "") and default == []
        try:
            return math.isclose(float(text), float(default), rel_tol=1e-12)
        except ValueError:
            return False
    if default is None:
        return value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool) and value == default
    if isinstance(default, (int, float)):
        try:
            return math.isclose(float(value), float(default), rel_tol=1e-12)
        except (TypeError, ValueError):
            return False
    if isinstance(default, str):
        return str(value).strip() == default
    return value == default


def jwst_default(step: str, name: str) -> tuple[bool, Any]:
    """(True, default) when ``name`` is a jwst 3.0 parameter of step ``step`` (its own or
    stpipe's), else (False, None)."""
    own = STEP_PARAMS.get(step, {})
    if name in own:
        return True, own[name]
    if step in STEP_PARAMS and name in COMMON:
        return True, COMMON[name]
    return False, None


def refuse_unimplemented(step: str, name: str, value: Any) -> bool:
    """For a parameter a streamdet step does not declare: True when it is a jwst
    parameter at jwst's default (accepted: nothing to do); a one-line BadInputError
    naming it when it is a jwst parameter set to something else; False when jwst does
    not know it either (the caller reports an unknown parameter)."""
    known, default = jwst_default(step, name)
    if not known:
        return False
    if same_value(value, default):
        return True
    raise BadInputError(
        f"parameter {step}.{name}={value!r}: jwst's {class_name(step)} has it, but streamdet "
        f"does not implement it yet; only jwst's default ({default!r}) is accepted")


def check_missing_step(step: str, values: dict[str, Any]) -> None:
    """Settings for a jwst step streamdet does not have: skipping it, and parameters at
    jwst's defaults, are accepted (the step does not run); anything else is refused."""
    for name, value in values.items():
        if name == "skip" and same_value(value, True):
            continue
        known, default = jwst_default(step, name)
        if not known:
            raise BadInputError(f"parameter {step}.{name}: jwst's {class_name(step)} has no "
                                f"parameter {name!r}")
        if not same_value(value, default):
            raise BadInputError(
                f"parameter {step}.{name}={value!r}: streamdet has no {step} step (jwst's "
                f"{class_name(step)}); it can only be skipped or left at jwst's defaults")


def threads_for(value: Any, cpus: int) -> int:
    """jwst's ``maximum_cores`` (an integer, 'quarter', 'half' or 'all') as a thread count."""
    text = str(value).strip().lower()
    fractions = {"all": 1.0, "half": 0.5, "quarter": 0.25}
    if text in fractions:
        return max(1, int(cpus * fractions[text]))
    try:
        n = int(text)
    except ValueError:
        raise BadInputError(f"maximum_cores={value!r}: expected an integer, 'quarter', "
                            "'half' or 'all'") from None
    if n < 1:
        raise BadInputError(f"maximum_cores={value!r}: must be at least 1")
    return n


# -- parameter files -------------------------------------------------------------------


@dataclass
class ParameterFile:
    """One stpipe parameter file: the pipeline's own parameters, and per step alias the
    step's. ``steps`` keeps the file's order; names not recognised as jwst Detector1
    steps are kept under their own name (the caller reports them)."""

    path: Path
    class_name: str | None
    name: str | None
    pipeline: dict[str, Any] = field(default_factory=dict)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)


def is_asdf(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(5) == b"#ASDF"
    except OSError:
        return False


def read_parameter_file(path: str | Path) -> ParameterFile:
    """Read an stpipe ASDF parameter file (a pipeline's or one step's).

    A step's file (class ``...JumpStep``) becomes ``steps={"jump": {...}}``; a
    pipeline's puts its own parameters in ``pipeline``. Errors are one-line
    BadInputErrors naming the file."""
    import asdf  # noqa: PLC0415 - only parameter files need it

    path = Path(path)
    try:
        with asdf.open(path, lazy_load=False, memmap=False) as af:
            tree = plain(dict(af.tree))
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such parameter file") from None
    except Exception as exc:
        raise BadInputError(f"{path}: not a readable ASDF parameter file ({exc})") from None
    params = tree.get("parameters")
    if not isinstance(params, dict):
        raise BadInputError(f"{path}: not an stpipe parameter file (no 'parameters' mapping)")
    params = dict(params)
    cls = tree.get("class", params.pop("class", None))
    name = tree.get("name", params.pop("name", None))
    substeps: list[tuple[str, dict]] = []
    if isinstance(tree.get("steps"), list):
        for sub in tree["steps"]:
            if not isinstance(sub, dict) or not isinstance(sub.get("parameters"), dict):
                raise BadInputError(f"{path}: an entry of 'steps' has no 'parameters' mapping")
            substeps.append((str(sub.get("name") or sub.get("class") or "?"),
                             dict(sub["parameters"]) | {"__class": sub.get("class")}))
    legacy = params.pop("steps", None)
    if isinstance(legacy, dict):
        for sub_name, sub in legacy.items():
            sub = dict(sub or {})
            sub_class = sub.pop("class", None)
            sub.pop("name", None)
            substeps.append((str(sub_name), sub | {"__class": sub_class}))
    out = ParameterFile(path, str(cls) if cls else None, str(name) if name else None)
    own_alias = alias_of(str(cls or "")) or alias_of(str(name or ""))
    if cls and own_alias is None and str(cls).rsplit(".", 1)[-1] != PIPELINE_NAME:
        raise BadInputError(f"{path}: parameters of {cls}, not of {PIPELINE_NAME} or one "
                            "of its steps")
    if own_alias is not None and not substeps:
        out.steps[own_alias] = params
        return out
    out.pipeline = params
    for sub_name, sub in substeps:
        sub_class = sub.pop("__class", None)
        alias = alias_of(sub_name) or alias_of(str(sub_class or "")) or sub_name
        out.steps.setdefault(alias, {}).update(sub)
    return out


def plain(value):
    """ASDF tree values as plain Python: dicts for mappings, lists for sequences, Python
    scalars for numpy ones (the products' provenance is read back with it too)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def write_parameter_file(path: str | Path, pipeline: dict[str, Any],
                         steps: dict[str, dict[str, Any]]) -> None:
    """Write a Detector1Pipeline parameter file jwst reads back (``strun --config``,
    ``Detector1Pipeline.call(config_file=...)``): every jwst step with every one of its
    parameters, ``steps``' values over jwst's defaults."""
    import asdf  # noqa: PLC0415

    def full(own: dict, given: dict) -> dict:
        merged = {**COMMON, **own, **given}
        return {k: merged[k] for k in sorted(merged)}

    tree = {
        "class": PIPELINE_CLASS,
        "name": PIPELINE_NAME,
        "parameters": full({**PIPELINE_PARAMS, "skip": False}, pipeline),
        "steps": [{"class": STEP_CLASSES[alias], "name": alias,
                   "parameters": full(STEP_PARAMS[alias], steps.get(alias, {}))}
                  for alias in STEP_CLASSES],
    }
    af = asdf.AsdfFile(tree)
    af.write_to(str(path))
