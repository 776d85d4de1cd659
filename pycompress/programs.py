"""Exported programs of converted models for serving processes: ``torch.export`` archives and AOTInductor
packages (both ``.pt2``), each carrying a record of the pycompress release that wrote it and of the
``torch.ops.pycompress`` ops it calls.

Why the record: a program calls pycompress's ops by name through torch's dispatcher; neither torch.export
nor AOTInductor packages the ops themselves. A process that has not imported pycompress gets torch's
"failed to resolve torch.ops.pycompress.int8_linear" or "Could not find schema for pycompress::int8_linear";
one with an older release may lack an op; and one with another release may run ops whose kernels read the
program's constants (the converted layers' packed buffers) in other layouts under the same schema.
``load_program`` and ``load_compiled_program`` import the ops (this module is part of pycompress), then
compare the record with this release before torch reads the program, and name what does not match.

AOTInductor: the package's generated C++ calls pycompress's ops back through the dispatcher, where
pycompress registers them from Python (``torch.library``), so it runs in a Python process that imported
pycompress, bit for bit as the exported program does. A Python-free deployment (libtorch alone) would need
the ops registered from C++ against libtorch, which the torch-free kernels (no torch headers, any torch
version) rule out. The package also holds code compiled for the building machine's CPU (its metadata
names the ISA); pycompress's ops still choose their kernels on the CPU that runs them.

The record, JSON: ``{"pycompress": version, "torch": version, "ops": {"pycompress::int8_linear.default":
schema, ...}}``; a torch.export archive holds it as its extra file ``pycompress.json``, an AOTInductor
package as the metadata key ``pycompress`` (``aot_inductor.metadata``).
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import dataclass

import torch

from pycompress._native import build_info

RECORD_FILE = "pycompress.json"  # the torch.export archive's extra file
RECORD_KEY = "pycompress"  # the AOTInductor package's metadata key


@dataclass(frozen=True)
class ProgramInfo:
    """What ``program_info`` reads from a ``.pt2`` without loading it. ``kind``: "export" (torch.export
    archive) or "aoti" (AOTInductor package); ``pycompress`` / ``torch``: the versions that wrote it, and
    ``ops``: {qualified op overload: schema} (all None / empty when pycompress did not write it)."""

    path: str
    kind: str
    pycompress: str | None
    torch: str | None
    ops: dict[str, str]


def _pycompress_ops(program: torch.export.ExportedProgram) -> dict[str, str]:
    ops = {}
    for module in program.graph_module.modules():  # nested graphs (control flow) too
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            target = node.target
            if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) \
                    and target.namespace == "pycompress":
                ops[f"{target.name()}.{target._overloadname}"] = str(target._schema)
    return dict(sorted(ops.items()))


def _record(program: torch.export.ExportedProgram) -> str:
    return json.dumps({"pycompress": build_info()["version"], "torch": torch.__version__,
                       "ops": _pycompress_ops(program)})


def _exported(model, example_inputs, options: dict) -> torch.export.ExportedProgram:
    if isinstance(model, torch.export.ExportedProgram):
        if example_inputs is not None or options:
            raise ValueError("an ExportedProgram is exported already: pass no example_inputs or export options")
        return model
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    return torch.export.export(model, tuple(example_inputs), **options)


def export_program(model: torch.nn.Module, example_inputs, path: str | os.PathLike,
                   **export_options) -> torch.export.ExportedProgram:
    """``torch.export`` ``model`` (a converted model, or any) on ``example_inputs`` (a tuple) and save the program
    to ``path`` with pycompress's record. ``export_options`` go to ``torch.export.export`` (``dynamic_shapes``,
    ``kwargs``, ``strict``). Returns the program; ``load_program`` loads the file."""
    program = _exported(model, example_inputs, export_options)
    torch.export.save(program, os.fspath(path), extra_files={RECORD_FILE: _record(program)})
    return program


def compile_program(model: torch.nn.Module | torch.export.ExportedProgram, example_inputs, path: str | os.PathLike,
                    *, inductor_configs: dict | None = None, **export_options) -> str:
    """AOTInductor-compile ``model`` (exported here on ``example_inputs``, or an ``ExportedProgram`` with
    ``example_inputs=None``) into the package ``path``, with pycompress's record in its metadata. Returns the
    path; ``load_compiled_program`` loads it (in a process with pycompress: see the module docstring)."""
    from torch._inductor import aoti_compile_and_package

    program = _exported(model, example_inputs, export_options)
    configs = dict(inductor_configs or {})
    configs["aot_inductor.metadata"] = {**configs.get("aot_inductor.metadata", {}), RECORD_KEY: _record(program)}
    return aoti_compile_and_package(program, package_path=os.fspath(path), inductor_configs=configs)


def _parse_record(text: str | bytes, path: str) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: pycompress's program record is not JSON: {exc}") from None
    if not (isinstance(record, dict) and isinstance(record.get("pycompress"), str)
            and isinstance(record.get("ops"), dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in record["ops"].items())):
        raise ValueError(f"{path}: pycompress's program record is malformed: {str(text)[:200]}")
    return record


def program_info(path: str | os.PathLike) -> ProgramInfo:
    """The kind of ``.pt2`` at ``path`` and pycompress's record in it, read from the archive without loading
    the program (so it works where the program would not load)."""
    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            aoti = any("/data/aotinductor/" in n for n in names)
            record = None
            for name in names:
                if not aoti and name.endswith(f"/extra/{RECORD_FILE}"):
                    record = _parse_record(archive.read(name), path)
                elif aoti and "/data/aotinductor/" in name and name.endswith("_metadata.json"):
                    metadata = json.loads(archive.read(name))
                    if isinstance(metadata, dict) and RECORD_KEY in metadata:
                        record = _parse_record(metadata[RECORD_KEY], path)
                if record is not None:
                    break
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{path}: not a .pt2 archive (torch.export / AOTInductor): {exc}") from None
    if record is None:
        return ProgramInfo(path, "aoti" if aoti else "export", None, None, {})
    return ProgramInfo(path, "aoti" if aoti else "export", record["pycompress"], record.get("torch"),
                       record["ops"])


def _schema_here(op: str) -> str | None:
    """This process's schema of a recorded op overload ("pycompress::name.overload"), None when unregistered."""
    qualified, _, overload = op.rpartition(".")
    namespace, _, name = qualified.partition("::")
    try:
        return str(getattr(getattr(getattr(torch.ops, namespace), name), overload)._schema)
    except (AttributeError, RuntimeError):
        return None


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(v) for v in re.findall(r"\d+", version.split("+")[0])[:3])


def _check(info: ProgramInfo, allow_version_mismatch: bool, caller: str) -> None:
    where = f"{caller}({info.path})"
    if info.pycompress is None:
        return  # not written by export_program / compile_program: torch loads it as it is
    here = build_info()["version"]
    saved = f"saved by pycompress {info.pycompress}"
    missing = [op for op in info.ops if _schema_here(op) is None]
    if missing:
        why = (f"{saved}, a newer release: upgrade pycompress" if _release(info.pycompress) > _release(here)
               else f"{saved}; this pycompress ({here}) was built without it")
        raise ValueError(f"{where}: the program calls {', '.join(missing)}, which this pycompress ({here}) does not "
                         f"register: {why}")
    changed = [op for op, schema in info.ops.items() if _schema_here(op) != schema]
    if changed:
        op = changed[0]
        raise ValueError(f"{where}: op {op} is `{info.ops[op]}` in the program ({saved}) but `{_schema_here(op)}` "
                         f"in this pycompress ({here}); export the model again with this release")
    if info.pycompress != here and not allow_version_mismatch:
        raise ValueError(f"{where}: {saved}, this is pycompress {here}. The program's constants are packed weights "
                         f"in the layouts {info.pycompress}'s kernels read, which another release may read differently: "
                         f"export the model again with {here} (allow_version_mismatch=True loads it anyway)")


def load_program(path: str | os.PathLike, *, allow_version_mismatch: bool = False) -> torch.export.ExportedProgram:
    """Load a ``torch.export`` archive written by ``export_program`` (``.module()`` runs it), after checking its
    record against this pycompress: every op it calls registered with the same schema, and the same release
    (``allow_version_mismatch=True`` skips the last). A ``.pt2`` without a record loads as ``torch.export.load``
    would, with pycompress's ops registered."""
    info = program_info(path)
    if info.kind != "export":
        raise ValueError(f"load_program({info.path}): an AOTInductor package; load it with load_compiled_program")
    _check(info, allow_version_mismatch, "load_program")
    return torch.export.load(info.path)


def load_compiled_program(path: str | os.PathLike, *, allow_version_mismatch: bool = False):
    """Load an AOTInductor package written by ``compile_program``, after the checks of ``load_program``.
    Returns the callable ``torch._inductor.aoti_load_package`` gives."""
    from torch._inductor import aoti_load_package

    info = program_info(path)
    if info.kind != "aoti":
        raise ValueError(f"load_compiled_program({info.path}): a torch.export archive; load it with load_program")
    _check(info, allow_version_mismatch, "load_compiled_program")
    return aoti_load_package(info.path)
