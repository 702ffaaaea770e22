"""`kd push`: upload a model kd saved, with its card, to a Hugging Face Hub repository.

The repository is made first when it does not exist (``--private`` makes it private; one that exists
keeps its visibility). Then one commit adds every file of the model's folder but kd's bookkeeping
(``done.json``, the partial files of an interrupted write) and its card as built for the Hub: the
folder's card, with the loading snippet naming the repository (``card.build_card``). The Hub is
``HF_ENDPOINT`` when it is set. What the user can fix (no token, a repository they may not write
to, no network, offline mode) becomes a KdError.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kdcli import __version__
from kdcli.card import CARD, build_card, recorded_recipe, saved_folder
from kdcli.errors import KdError, ModelError
from kdcli.recipe import Recipe
from kdcli.roles import Role, check
from kdcli.rundir import DONE, RunDir

_LOGIN = "log in with `hf auth login` (or set HF_TOKEN) with a token that may write"


def push_role(recipe: Recipe, role: Role, repo_id: str, private: bool = False) -> dict[str, Any]:
    """Upload ``role``'s model folder to ``repo_id``; returns the repository's URL, the commit and the files sent."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise KdError(f"--repo {repo_id!r} is not a Hub repository id",
                      "give NAMESPACE/NAME (letters, digits, '-', '_', '.'), e.g. your-name/finance-student") from None
    run = RunDir.for_recipe(recipe)
    folder = _folder(recipe, run, role)
    if get_token() is None:
        raise KdError("no Hugging Face token: pushing a model needs one", _LOGIN)
    # Read when kd pushes, not when huggingface_hub was first imported, which is when it reads it itself.
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    api = HfApi(endpoint=endpoint)
    card = build_card(recorded_recipe(run) or recipe, run, role, folder, repo_id=repo_id)
    files = _files(folder)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
    operations.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=str(card).encode()))
    created = True
    try:
        try:
            api.create_repo(repo_id, private=private)
        except HfHubHTTPError as exc:
            if exc.response.status_code != 409:  # 409: it exists; whether we may write to it, the commit says
                raise _hub_error(exc, f"cannot create {repo_id} on {endpoint}", repo_id) from None
            created = False
        try:
            commit = api.create_commit(repo_id, operations=operations,
                                       commit_message=f"{role} of kd run {recipe.name} (kd {__version__})")
        except HfHubHTTPError as exc:
            raise _hub_error(exc, f"cannot upload to {repo_id} on {endpoint}", repo_id) from None
        except ValueError as exc:  # the Hub checks the card's metadata before anything is uploaded
            raise KdError(f"the Hub refused the model card of {role}: {exc}",
                          "this is a bug in kd's model card; please report it with the message above") from None
    except (OSError, _transport_error()) as exc:  # no network, a refused connection, offline mode
        raise _network_error(exc, endpoint) from None
    return {"role": str(role), "repo": repo_id, "url": f"{endpoint}/{repo_id}", "created": created,
            "private": private if created else None, "commit": commit.oid, "commit_url": commit.commit_url,
            "folder": str(folder), "files": sorted([*files, CARD])}


def _folder(recipe: Recipe, run: RunDir, role: Role) -> Path:
    """The folder of ``role``'s model, or why there is none to push."""
    folder = saved_folder(recipe, run, role)
    if folder is not None:
        return folder
    if role.trained or role.kind == "teacher":
        check(recipe, role)  # names the command that makes it (distill, or the teacher's fine-tuning)
    why = {"baseline": "the baseline is the student before training, built in memory: kd never saves it",
           "teacher": f"teacher {role.name} is not fine-tuned by kd: its weights are "
                      f"{recipe.teachers[role.name].ref if role.name in recipe.teachers else 'not in the recipe'}",
           "model": f"{role} is not a model of this run"}.get(role.kind, f"{role} has no saved model")
    raise ModelError(why, "kd push uploads the models kd saved: student, dataset, student:NAME, or a teacher "
                          "with a `finetune` table once it is fine-tuned")


def _files(folder: Path) -> list[str]:
    """The model's files as the repository will hold them; the card is built anew."""
    names = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name not in (CARD, DONE) and not any(part.startswith(".") for part in Path(name).parts):
            names.append(name)
    return names


def _hub_error(exc: Any, what: str, repo_id: str) -> KdError:
    status = exc.response.status_code
    said = exc.server_message or str(exc).splitlines()[0]
    if status == 401:
        return KdError(f"{what}: the Hub does not accept the token ({said})", _LOGIN)
    if status == 403:
        namespace = repo_id.split("/")[0] if "/" in repo_id else "your namespace"
        return KdError(f"{what}: not allowed ({said})",
                       f"the repository belongs to someone else, or the token may not write to '{namespace}': "
                       "push to a repository of your own (--repo YOUR-NAME/NAME) or of an organisation you "
                       "write to, with a token that has write access")
    if status == 404:
        return KdError(f"{what}: the Hub finds no such repository ({said})",
                       "check --repo; a repository someone else keeps private is not found either")
    return KdError(f"{what}: the Hub answered {status} ({said})",
                   "try again later; KD_DEBUG=1 shows the whole answer")


def _transport_error() -> type[Exception]:
    """What the HTTP library raises when it cannot talk to the Hub at all."""
    try:
        from httpx2 import TransportError  # huggingface_hub 2
    except ImportError:
        from httpx import TransportError  # huggingface_hub 1
    return TransportError


def _network_error(exc: Exception, endpoint: str) -> KdError:
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return KdError("huggingface_hub is in offline mode (HF_HUB_OFFLINE is set), so nothing can be pushed",
                       "unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) for `kd push`")
    return KdError(f"cannot reach the Hub at {endpoint}: {exc}",
                   "check the network connection, and HF_ENDPOINT if you set it")
