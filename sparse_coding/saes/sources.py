"""Where an SAE comes from, for every flag that names one (`--load_autoencoders`, `--sae_dir`):

- a local folder: one SAE in SAELens' layout (ours, or any SAELens wrote for an architecture we have), or a run
  folder / folder of such SAEs;
- `hf:org/repo` or `hf:org/repo/sub/folder`: a Hugging Face hub repository (or a folder in it), fetched with
  huggingface_hub into its cache (`HF_HUB_OFFLINE=1` reads the cache alone);
- `release/id`: a SAELens pretrained SAE, found in SAELens' own registry and loaded by SAELens (which converts the
  formats some releases use), then saved once in SAELens' layout under ~/.cache/sparse_coding/pretrained/
  ($SPARSE_CODING_CACHE), where later runs find it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sparse_coding.errors import SAEFolderError

HF_PREFIX = "hf:"


def resolve_sae_source(spec: str) -> Path:
    """Gives a local folder for an SAE source (see the module docstring), fetching it if it is remote."""
    if spec.startswith(HF_PREFIX):
        parts = spec[len(HF_PREFIX) :].strip("/").split("/")
        if len(parts) < 2 or not all(parts[:2]):
            raise SAEFolderError(f"{spec!r}: write a hub repository as hf:org/repo or hf:org/repo/sub/folder")
        return hub_folder("/".join(parts[:2]), "/".join(parts[2:]))
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")):
        return path
    pretrained = saelens_pretrained(spec)
    if pretrained is not None:
        return pretrained
    return path  # not a source we know: the caller's own check names it as a missing folder


def hub_folder(repo_id: str, subfolder: str = "") -> Path:
    """Gives the local copy of a hub repository's folder (the files under it only), through huggingface_hub."""
    from huggingface_hub import snapshot_download

    try:
        root = snapshot_download(repo_id, allow_patterns=[f"{subfolder}/*"] if subfolder else None)
    except Exception as e:  # the network, the hub, the name or the offline cache: one line naming the repository
        raise SAEFolderError(f"cannot fetch {repo_id} from the Hugging Face hub: {type(e).__name__}: {e}") from e
    folder = Path(root) / subfolder
    if not folder.is_dir():
        raise SAEFolderError(f"the hub repository {repo_id} has no folder {subfolder!r}")
    return folder


def saelens_pretrained(spec: str) -> Path | None:
    """Gives the local folder of SAELens pretrained SAE `release/id` (loading and saving it on first use), or None
    when no release in SAELens' registry is a prefix of spec (or sae_lens is not installed)."""
    try:
        from sae_lens import SAE
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:
        return None
    directory = get_pretrained_saes_directory()
    release = next((r for r in sorted(directory, key=len, reverse=True) if spec.startswith(r + "/")), None)
    if release is None:
        return None
    sae_id = spec[len(release) + 1 :]
    if sae_id not in directory[release].saes_map:
        known = ", ".join(list(directory[release].saes_map)[:5])
        raise SAEFolderError(f"SAELens release {release!r} has no SAE {sae_id!r} (it has {known}, ...)")
    cache = Path(os.environ.get("SPARSE_CODING_CACHE") or Path.home() / ".cache" / "sparse_coding")
    folder = cache / "pretrained" / release / sae_id.replace("/", "__")
    if not (folder / "cfg.json").is_file():
        try:
            loaded = SAE.from_pretrained(release, sae_id, device="cpu")
        except Exception as e:  # download, conversion: one line naming the SAE
            raise SAEFolderError(f"SAELens could not load {release}/{sae_id}: {type(e).__name__}: {e}") from e
        sae = loaded[0] if isinstance(loaded, tuple) else loaded  # older SAELens gives (sae, cfg, sparsity)
        partial = folder.with_name(folder.name + ".partial")  # renamed when whole: a kill leaves no half SAE
        shutil.rmtree(partial, ignore_errors=True)
        sae.save_model(str(partial))
        os.replace(partial, folder)
    return folder
