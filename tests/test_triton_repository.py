"""Generated Triton model repositories: every config.pbtxt parses as Triton's ModelConfig and
agrees with the exported ONNX graph on names, dtypes and dims."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from serving_helpers import export_random_encoder
from tritonclient.grpc import model_config_pb2 as mc

from ascl import names
from ascl.cli import main
from ascl.serving.collections.faiss_index import GalleryIndex
from ascl.serving.online.repository import TRT_MAX_BATCH, Batching, write_repository

ONNX_TO_TRITON = {onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.FLOAT: "TYPE_FP32"}


@pytest.fixture(scope="module")
def model_and_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("repo")
    onnx_path = export_random_encoder(root / "encoder.onnx", image_size=40)
    index = GalleryIndex.create(128, "Flat")
    vectors = np.eye(4, 128, dtype=np.float32)
    index.add(vectors, [{"path": f"{i}.png"} for i in range(4)])
    index.save(root / "idx")
    return onnx_path, root / "idx"


def parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def graph_io(onnx_path: Path) -> dict[str, tuple[str, list[int | str]]]:
    graph = onnx.load(str(onnx_path)).graph
    out = {}
    for value in [*graph.input, *graph.output]:
        t = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
        out[value.name] = (ONNX_TO_TRITON[t.elem_type], dims)
    return out


def dtype(value: int) -> str:
    return str(mc.DataType.Name(value))


@pytest.mark.parametrize("platform", ["python", "onnxruntime", "tensorrt"])
def test_configs_match_onnx_graph(model_and_index: tuple[Path, Path], tmp_path: Path, platform: str) -> None:
    onnx_path, index_dir = model_and_index
    repo = write_repository(tmp_path / "models", onnx_path, index_dir, platform=platform,
                            copy_index=platform != "python")
    configs = {p.parent.name: parse(p) for p in repo.glob("*/config.pbtxt")}
    assert set(configs) == {names.MODEL_PREPROCESS, names.MODEL_ENCODER, names.MODEL_SEARCH, names.MODEL_EMBED,
                            names.MODEL_IMAGE_SEARCH}
    for name, config in configs.items():
        assert config.name == name and (repo / name / "1").is_dir()

    io = graph_io(onnx_path)
    enc = configs[names.MODEL_ENCODER]
    (inp,), (out,) = enc.input, enc.output
    assert (inp.name, dtype(inp.data_type)) == (names.IMAGES, io[names.IMAGES][0])
    assert list(inp.dims) == io[names.IMAGES][1][1:] == [40, 40, 3]  # batch axis is Triton's
    assert isinstance(io[names.IMAGES][1][0], str)  # dynamic batch in the graph
    assert (out.name, dtype(out.data_type), list(out.dims)) == (names.EMBEDDINGS, "TYPE_FP32", [128])
    graph_dim = io[names.EMBEDDINGS][1][1]
    if isinstance(graph_dim, str):  # the exporter left it symbolic: take what ONNX Runtime produces
        from ascl.export.runtime import OnnxEmbedder

        graph_dim = OnnxEmbedder(onnx_path).embed(np.zeros((1, 40, 40, 3), np.uint8)).shape[1]
    assert graph_dim == 128
    assert enc.HasField("dynamic_batching") and len(enc.model_warmup) >= 1
    expected = {"python": ("python", ""), "onnxruntime": ("", "onnxruntime_onnx"), "tensorrt": ("", "tensorrt_plan")}
    assert (enc.backend, enc.platform) == expected[platform]
    if platform != "python":
        assert enc.max_batch_size == TRT_MAX_BATCH

    pre = configs[names.MODEL_PREPROCESS]
    assert [(t.name, dtype(t.data_type), list(t.dims)) for t in pre.input] == [(names.IMAGE_BYTES, "TYPE_STRING", [1])]
    assert [(t.name, dtype(t.data_type), list(t.dims)) for t in pre.output] == [(names.IMAGES, "TYPE_UINT8", [40, 40, 3])]
    search = configs[names.MODEL_SEARCH]
    assert [(t.name, dtype(t.data_type)) for t in search.output] == [
        (names.IDS, "TYPE_INT64"), (names.SCORES, "TYPE_FP32"), (names.METADATA, "TYPE_STRING")]
    assert list(search.input[0].dims) == [128]
    # the metadata filter: an optional BYTES row on `search` and on the `image_search` ensemble,
    # which maps it into its search step (a request without it leaves it out there too)
    for model in (search, configs[names.MODEL_IMAGE_SEARCH]):
        where = {t.name: t for t in model.input}[names.WHERE]
        assert (dtype(where.data_type), list(where.dims), where.optional) == ("TYPE_STRING", [1], True)
        others = [t.name for t in model.input if t.optional]
        assert others == [names.WHERE]
    if platform != "python":  # the ensemble maps it into its search step
        (search_step,) = [s for s in configs[names.MODEL_IMAGE_SEARCH].ensemble_scheduling.step
                          if s.model_name == names.MODEL_SEARCH]
        assert search_step.input_map[names.WHERE] == names.WHERE
    index_param = search.parameters["index_dir"].string_value
    assert Path(index_param) == index_dir if platform == "python" else (repo / "search" / "1" / index_param / "manifest.json").is_file()

    # Production: `embed` and `image_search` are ensembles around the native encoder. Every step
    # names an existing model, maps tensors that model declares, and the chain's tensors have one
    # producer each with matching dtypes. Embedded: one Python model each (templates/fused.py).
    for ens_name in (names.MODEL_EMBED, names.MODEL_IMAGE_SEARCH):
        ens = configs[ens_name]
        if platform == "python":
            assert (ens.backend, ens.platform, ens.parameters["task"].string_value) == (
                "python", "", "search" if ens_name == names.MODEL_IMAGE_SEARCH else "embed")
            assert ens.instance_group[0].count >= 1 and (repo / ens_name / "1" / "model.onnx").is_file()
            continue
        assert ens.platform == "ensemble"
        produced = {t.name: dtype(t.data_type) for t in ens.input}
        for step in ens.ensemble_scheduling.step:
            target = configs[step.model_name]
            assert ens.max_batch_size <= target.max_batch_size
            declared_in = {t.name: dtype(t.data_type) for t in target.input}
            for key, value in step.input_map.items():
                assert produced[value] == declared_in[key]
            optional_in = {t.name for t in target.input if t.optional}
            ensemble_optional = {t.name for t in ens.input if t.optional}
            assert {key for key, value in step.input_map.items() if value in ensemble_optional} <= optional_in
            declared_out = {t.name: dtype(t.data_type) for t in target.output}
            for key, value in step.output_map.items():
                assert value not in produced
                produced[value] = declared_out[key]
        for t in ens.output:
            assert produced[t.name] == dtype(t.data_type)


def public_face(config: mc.ModelConfig) -> tuple[object, ...]:
    """What a client sees of a model: its batch limit and its tensors (name, dtype, dims, optional)."""
    def tensors(items: object) -> list[tuple[str, str, list[int], bool]]:
        return [(t.name, dtype(t.data_type), list(t.dims), bool(getattr(t, "optional", False))) for t in items]

    return config.max_batch_size, tensors(config.input), tensors(config.output)


def test_embedded_and_production_repositories_serve_the_same_public_models(model_and_index: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:
    """The fused models of the embedded repository take and give what the production ensembles do."""
    onnx_path, index_dir = model_and_index
    embedded = write_repository(tmp_path / "embedded", onnx_path, index_dir)
    production = write_repository(tmp_path / "production", onnx_path, index_dir, platform="onnxruntime",
                                  copy_index=True)
    for name in (names.MODEL_EMBED, names.MODEL_IMAGE_SEARCH):
        fused, ensemble = parse(embedded / name / "config.pbtxt"), parse(production / name / "config.pbtxt")
        assert (fused.backend, ensemble.platform) == ("python", "ensemble")
        assert public_face(fused) == public_face(ensemble), name
    search = parse(embedded / names.MODEL_IMAGE_SEARCH / "config.pbtxt")
    assert Path(search.parameters["index_dir"].string_value) == index_dir
    assert "index_dir" not in parse(embedded / names.MODEL_EMBED / "config.pbtxt").parameters
    # embedded with a copied index: the fused model reaches the copy in the search model's folder
    copied = write_repository(tmp_path / "copied", onnx_path, index_dir, copy_index=True)
    relative = parse(copied / names.MODEL_IMAGE_SEARCH / "config.pbtxt").parameters["index_dir"].string_value
    assert (copied / names.MODEL_IMAGE_SEARCH / "1" / relative / "manifest.json").is_file()


@pytest.mark.parametrize("platform", ["python", "onnxruntime"])
def test_queue_delays_default_to_none_and_are_configurable(model_and_index: tuple[Path, Path], tmp_path: Path,
                                                           platform: str) -> None:
    """A lone request waits for nobody by default; ``Batching`` sets every model's delay and the hot path's instances."""
    def batched(repo: Path) -> dict[str, mc.ModelConfig]:
        configs = {p.parent.name: parse(p) for p in repo.glob("*/config.pbtxt")}
        return {name: c for name, c in configs.items() if c.platform != "ensemble"}

    default = batched(write_repository(tmp_path / "default", *model_and_index, platform=platform,
                                       copy_index=platform != "python"))
    assert default and all(c.HasField("dynamic_batching") for c in default.values())
    assert {name: c.dynamic_batching.max_queue_delay_microseconds for name, c in default.items()} == dict.fromkeys(
        default, 0)
    tuned = batched(write_repository(tmp_path / "tuned", *model_and_index, platform=platform,
                                     copy_index=platform != "python", batching=Batching(queue_delay_us=250, instances=3)))
    assert {c.dynamic_batching.max_queue_delay_microseconds for c in tuned.values()} == {250}
    hot = [names.MODEL_IMAGE_SEARCH, names.MODEL_EMBED, names.MODEL_ENCODER] if platform == "python" else []
    assert all(tuned[name].instance_group[0].count == 3 for name in hot)
    if platform != "python":  # the native encoder keeps the TensorRT profile's preferred batches
        assert list(tuned[names.MODEL_ENCODER].dynamic_batching.preferred_batch_size) == [64, TRT_MAX_BATCH]
    with pytest.raises(ValueError, match="must be >= 0"):
        Batching(queue_delay_us=-1)


def test_python_models_vendor_what_they_import(model_and_index: tuple[Path, Path], tmp_path: Path) -> None:
    repo = write_repository(tmp_path / "models", *model_and_index)
    for model in (names.MODEL_PREPROCESS, names.MODEL_ENCODER, names.MODEL_SEARCH, names.MODEL_EMBED,
                  names.MODEL_IMAGE_SEARCH):
        version = repo / model / "1"
        assert "class TritonPythonModel" in (version / "model.py").read_text()
        assert (version / "ascl" / "images.py").is_file() and (version / "ascl" / "serving" / "collections" / "index.py").is_file()
        assert (version / "ascl" / "serving" / "collections" / "filters.py").is_file()  # index.py imports it
    assert (repo / names.MODEL_ENCODER / "1" / "model.onnx").stat().st_size > 1_000_000


def test_repository_only_cli_prints_docker_command(model_and_index: tuple[Path, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    onnx_path, index_dir = model_and_index
    out = tmp_path / "prod"
    assert main(["serve", "--model", str(onnx_path), "--index", str(index_dir), "--repository-only", str(out),
                 "--platform", "tensorrt"]) == 0
    text = capsys.readouterr().out
    assert "docker run" in text and f"{out.resolve()}:/models" in text and "tritonserver --model-repository=/models" in text
    assert "--min 1 --opt 64 --max 256" in text
    assert parse(out / "encoder" / "config.pbtxt").platform == "tensorrt_plan"


def test_mismatched_index_dim_is_refused(model_and_index: tuple[Path, Path], tmp_path: Path) -> None:
    onnx_path, _ = model_and_index
    small = GalleryIndex.create(16, "Flat")
    small.add(np.eye(2, 16, dtype=np.float32), [{}, {}])
    small.save(tmp_path / "idx16")
    with pytest.raises(ValueError, match="does not match the model's embedding dim 128"):
        write_repository(tmp_path / "models", onnx_path, tmp_path / "idx16")
    assert not (tmp_path / "models").exists()
