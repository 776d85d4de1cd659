"""What every registered format inherits: these tests iterate ``pycompress.nn.FORMATS``, so a new format
(pycompress/nn/README.md) is checked by them without a line here. Each format, on a Linear and on a
Conv2d model: save/load bit-exact, a corrupt file refused, verify, summary, deepcopy / pickle / torch.save,
torch.compile, torch.export, many threads, and what model code reads from a layer (``weight``, ``bias``,
the shape attributes)."""

from __future__ import annotations

import copy
import json
import io
import pickle
import struct
import threading

import pytest
import torch
from torch import nn

import pycompress as pc
import pycompress.conversion as conversion
from pycompress.nn.registry import compressed_layers, is_compressed, module_bytes

KINDS = ("Linear", "Conv2d")
CASES = [(fmt, kind) for fmt in pc.nn.FORMATS for kind in KINDS]


def _float_model(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "Linear":
        return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16)).eval(), torch.randn(6, 32)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1)).eval(), torch.randn(2, 3, 8, 8)


def _converted(fmt: str, kind: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(model converted to ``fmt`` everywhere, its float reference, an input)."""
    model, x = _float_model(kind)
    pc.prune(model, sparsity=0.75)
    if fmt == "int8-static":  # the one format that needs calibration
        pc.quantize(model, [x], activations="static")
    reference = copy.deepcopy(model)
    pc.convert(model, policy=fmt)
    layers = compressed_layers(model)
    assert len(layers) == 2 and {m.format_name for _, m in layers} == {fmt}
    return model, reference, x


@pytest.fixture(params=CASES, ids=[f"{f}-{k}" for f, k in CASES])
def case(request):
    return _converted(*request.param)


def test_every_format_is_registered_by_its_layer_class():
    assert set(pc.nn.FORMATS) == {"int8-dynamic", "int8-static", "int4", "sparse-fp32", "sparse-int8"}
    assert set(conversion.FORMATS) == {"float", *pc.nn.FORMATS}
    for name, cls in pc.nn.LAYER_TYPES.items():
        assert cls.__name__ == name and issubclass(cls, pc.nn.CompressedLayer)


def test_save_load_round_trip_is_bit_exact(case, tmp_path):
    model, _, x = case
    pc.save(model, tmp_path / "m.safetensors")
    restored = pc.load(tmp_path / "m.safetensors")
    assert [(n, type(m), m.config()) for n, m in compressed_layers(restored)] == \
        [(n, type(m), m.config()) for n, m in compressed_layers(model)]
    assert torch.equal(restored(x), model(x))


def _flip_first_byte(path, key: str) -> None:
    raw = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    start, _ = json.loads(raw[8:8 + header_len])[key]["data_offsets"]
    raw[8 + header_len + start] ^= 0x10
    path.write_bytes(bytes(raw))


def test_a_corrupt_tensor_of_every_layer_is_refused(case, tmp_path):
    model, _, _ = case
    path = tmp_path / "m.safetensors"
    pc.save(model, path)
    clean = path.read_bytes()
    for name, _ in compressed_layers(model):
        key = next(k for k, v in model.state_dict().items() if k.startswith(name + ".") and torch.is_tensor(v)
                   and v.numel())
        path.write_bytes(clean)
        _flip_first_byte(path, key)
        with pytest.raises(ValueError, match=f"tensor {key} of layer {name} .* fails its sha256 checksum"):
            pc.load(path)


def test_verify_and_summary_report_the_format(case):
    model, reference, x = case
    report = pc.verify(model, reference, x)
    assert report.ok, str(report)
    fmt = {r.format for r in report.layers}
    rows = {r.name: r for r in pc.summary(model).rows}
    for name, layer in compressed_layers(model):
        assert rows[name].format == layer.format_name and {layer.format_name} == fmt
        assert rows[name].weight_bits == layer.weight_bits
        assert rows[name].bytes_after == module_bytes(layer)


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double"])
def test_a_dtype_cast_of_the_model_keeps_each_format_intact(case, cast):
    """model.half() / .to(torch.bfloat16) / .double() casts the float layers around the converted ones; a
    converted layer's buffers keep the dtypes its format fixes, so it computes the same bits for the same
    float32 input (CompressedLayer._apply)."""
    model, _, x = case
    expected = model(x)
    before = {name: b.dtype for name, b in model.named_buffers()}
    {"half": model.half, "bfloat16": lambda: model.to(torch.bfloat16), "double": model.double}[cast]()
    assert {name: b.dtype for name, b in model.named_buffers()} == before
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_on_the_cpu_are_the_float32_output_rounded_once(case, dtype):
    """Each converted layer takes a float16 / bfloat16 input as its exact float32 widening and rounds its output
    once to the input's dtype (as the CUDA kernels do), so a half-precision model runs on the CPU."""
    model, _, x = case
    xh = x.to(dtype)
    want = xh.float()
    for layer in model:
        want = layer(want).to(dtype).float() if is_compressed(layer) else layer(want)
    got = model(xh)
    assert got.dtype == dtype and torch.equal(got.float(), want)


def test_deepcopy_and_pickle_compute_the_same(case):
    model, _, x = case
    expected = model(x)  # builds the derived layouts too (their uint16 / uint32 buffers travel as well)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = {"deepcopy": copy.deepcopy(model), "pickle": pickle.loads(pickle.dumps(model)),
              "torch.save": torch.load(buffer, weights_only=False)}
    for how, restored in copies.items():
        before, after = dict(model.named_buffers()), dict(restored.named_buffers())
        assert after.keys() == before.keys(), how
        for name, b in before.items():
            assert after[name].dtype == b.dtype and torch.equal(after[name], b), (how, name)
        assert torch.equal(restored(x), expected), how


def test_torch_compile_and_export_see_the_kernels(case):
    model, _, x = case
    with torch.no_grad():
        expected = model(x)
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        # AOTAutograd over the fake implementations, then the ops (inductor: the next test, one model per format)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        program = torch.export.export(model, (x,))
        exported = program.module()(x)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("pycompress.") for t in targets), targets
    # The same bits as eager for every format: int8 sums are exact, and a traced fp32 sparse call reads the
    # panel layout an eager call reads (pycompress.ops.sparse.csr_panels_for).
    assert torch.equal(compiled, expected)
    assert torch.equal(exported, expected)


@pytest.mark.parametrize("fmt", list(pc.nn.FORMATS))
def test_traced_calls_give_the_eager_bits_on_every_isa(isa_paths, fmt):
    # K = 1100: three K panels of the csr panel layout, whose kernels sum per panel; batches of 1 (gather),
    # 2 and 6 (narrow panels), 40 (panels; the int8 cols kernels); one dynamic inductor compile and one export
    # for all.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1100, 24), nn.ReLU(), nn.Linear(24, 8)).eval()
    x = torch.randn(40, 1100)
    pc.prune(model, sparsity=0.75)
    if fmt == "int8-static":
        pc.quantize(model, [x], activations="static")
    pc.convert(model, policy=fmt)
    assert [m.format_name for _, m in compressed_layers(model)] == [fmt] * 2
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, dynamic=True)
        batch = torch.export.Dim("batch", min=1, max=1024)
        exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},)).module()
        for isa in isa_paths:
            pc.set_isa(isa)
            for m in (1, 2, 6, 40):
                expected = model(x[:m])
                assert torch.equal(compiled(x[:m]), expected), (isa, m)
                assert torch.equal(exported(x[:m]), expected), (isa, m)


def test_many_threads_compute_the_same(case):
    model, _, x = case
    expected = model(x)
    results, errors = [], []

    def run():
        try:
            for _ in range(10):
                results.append(torch.equal(model(x), expected))
        except Exception as exc:  # reported below, with the thread's error
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [True] * 60


def test_layers_answer_what_model_code_reads(case):
    model, reference, _ = case
    for name, layer in compressed_layers(model):
        float_layer = reference.get_submodule(name)
        w = float_layer.weight.detach()
        assert layer.weight.dtype == w.dtype and layer.weight.device == w.device and layer.weight.shape == w.shape
        assert layer.weight.dim() == w.dim() and layer.weight.size(0) == w.size(0)
        assert torch.equal(layer.bias, float_layer.bias.detach())
        value = layer.weight.dequantize()
        assert value.shape == w.shape
        if pc.nn.FORMATS[layer.format_name].int8_numbers:
            # half a quantization step of the channel's largest weight bounds every group's error too
            qmax = 2 ** (layer.weight_bits - 1) - 1
            step = layer.dequantized_weight().abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) / qmax
            assert ((value - w).abs() <= step / 2 * (1 + 1e-5)).all()
        else:
            assert torch.equal(value, w)
        # Any torch function given the weight computes with its float value, and so do tensor methods.
        assert torch.equal(torch.mul(layer.weight, 1.0), value)
        assert torch.equal(layer.weight.mT, value.mT) and torch.equal(layer.weight.float(), value)
        # Assigning a tensor (Hugging Face's tie_weights) is refused, naming the layer: its weight is the packed one.
        with pytest.raises(AttributeError, match=rf"{type(layer).__name__} \({layer.format_name}, .*cannot be "
                                                 r"assigned a tensor; tie or assign weights in the float model"):
            layer.weight = nn.Parameter(w.clone())
        if layer.FLOAT_KIND == "Linear":
            assert (layer.in_features, layer.out_features) == (float_layer.in_features, float_layer.out_features)
        else:
            for attr in ("in_channels", "out_channels", "kernel_size", "stride", "dilation", "groups", "padding_mode"):
                assert getattr(layer, attr) == getattr(float_layer, attr), attr
        assert not any(t.dtype == torch.float32 and t.shape == w.shape for t in layer.buffers())  # no float copy


def test_a_converted_hugging_face_vit_runs():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64)
    model = transformers.ViTModel(config).eval()
    reference = copy.deepcopy(model)
    pixels = torch.randn(2, 3, 16, 16)
    pc.convert(model, policy="int8")
    projection = model.embeddings.patch_embeddings.projection
    assert isinstance(projection, pc.nn.Int8Conv2d)  # the layer whose weight.dtype the model reads
    with torch.no_grad():
        out, ref = model(pixel_values=pixels).last_hidden_state, reference(pixel_values=pixels).last_hidden_state
    assert out.shape == ref.shape
    assert pc.verify(model, reference, {"pixel_values": pixels}).ok


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_converted_vit_cast_to_half_runs_and_its_layers_report_the_cast(dtype):
    # ViT casts its pixels to projection.weight.dtype: a cast model's layers must report the cast dtype, or
    # float32 embeddings reach its half-precision LayerNorms (a dtype error before).
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64)
    model = transformers.ViTModel(config).eval()
    pc.convert(model, policy="int8")
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(pixel_values=pixels).last_hidden_state
        projection = model.embeddings.patch_embeddings.projection
        projected = projection(pixels)
        model.to(dtype)
        assert projection.weight.dtype == dtype and projection.weight.dequantize().dtype == dtype
        assert all(t.dtype != dtype for t in projection.buffers())  # the format's buffers keep their dtypes
        out = model(pixel_values=pixels.to(dtype)).last_hidden_state
        assert out.dtype == dtype
        # bf16 / fp16 activations and LayerNorms: within the half type's rounding of the float32 model
        assert (out.float() - want).abs().max() <= 0.05 * want.abs().max()
        model.cpu()  # a move keeps the dtype
        assert projection.weight.dtype == dtype
        model.float()
        assert projection.weight.dtype == torch.float32
        assert torch.equal(projection(pixels), projected)  # the layer's bits (the float parts were rounded)
