"""The Kubernetes manifests (deploy/kubernetes/) against the Kubernetes API's own JSON schemas,
strictly (kubernetes-validate, offline), and what rankd needs of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.settings import Settings

MANIFESTS = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.37.0"


def _documents() -> list[tuple[str, dict[str, Any]]]:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    return [(name, doc) for name in kustomization["resources"]
            for doc in yaml.safe_load_all((MANIFESTS / name).read_text()) if doc]


def _one(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for _, d in _documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_every_file_is_in_the_kustomization() -> None:
    listed = set(yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize(("name", "doc"), _documents(),
                         ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_manifest_validates_strictly(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_refuses_a_broken_manifest() -> None:
    broken = _one("Deployment", "rankd-api")
    broken = yaml.safe_load(yaml.safe_dump(broken))
    broken["spec"]["replicas"] = "two"
    _container(broken)["livenessProbe"]["httpGet"]["prot"] = 8000  # a typo: strict refuses it
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_api_probes_secret_volume_and_autoscaler() -> None:
    api = _one("Deployment", "rankd-api")
    container = _container(api)
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    (key,) = [e for e in container["env"] if e["name"] == "RANKD_API_KEY"]
    assert key["valueFrom"]["secretKeyRef"] == {"name": "rankd-api-key", "key": "api-key"}
    assert "value" not in key  # never a key written in the manifest
    (mount,) = container["volumeMounts"]
    assert mount == {"name": "index", "mountPath": "/data/index", "readOnly": True}
    claim = api["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert _one("PersistentVolumeClaim", claim)
    hpa = _one("HorizontalPodAutoscaler", "rankd-api")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "rankd-api"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert _one("Service", "rankd-api")["spec"]["selector"] == \
        api["spec"]["selector"]["matchLabels"]


def test_vllm_requests_a_gpu_with_the_flags_rankd_needs() -> None:
    vllm = _one("Deployment", "rankd-vllm")
    container = _container(vllm)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for flag in ("--enable-prefix-caching", "--max-logprobs=64", "--generation-config=vllm"):
        assert flag in container["args"]
    settings = _one("ConfigMap", "rankd-settings")["data"]
    service = _one("Service", "rankd-vllm")
    assert settings["RANKD_RERANKER_VLLM_URL"] == \
        f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert settings["RANKD_RERANKER_MODEL"] == container["args"][0]


def test_index_job_writes_the_volume_the_api_reads() -> None:
    job = _one("Job", "rankd-index")
    spec = job["spec"]["template"]["spec"]
    assert spec["containers"][0]["command"] == ["rankd-index-init"]
    assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == "rankd-index"
    assert spec["containers"][0]["volumeMounts"][0]["mountPath"] == \
        _one("ConfigMap", "rankd-settings")["data"]["RANKD_INDEX_DIR"]


def test_configmap_names_only_real_settings() -> None:
    data = _one("ConfigMap", "rankd-settings")["data"]
    known = {f"RANKD_{name.upper()}" for name in Settings.model_fields} | {
        f"RANKD_RERANKER_{name.upper()}" for name in Settings.model_fields["reranker"]
        .annotation.model_fields}  # type: ignore[union-attr]
    # RANKD_CATALOG_* configure the index Job (docker/index-init.sh), not the service.
    assert {k for k in data if not k.startswith("RANKD_CATALOG_")} <= known
    Settings(**{k.removeprefix("RANKD_").lower(): v for k, v in data.items()
                if not k.startswith(("RANKD_RERANKER_", "RANKD_CATALOG_"))})
