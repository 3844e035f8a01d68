"""Remote sources (fsspec URLs: s3://, hf://, https://): URLs safe to print, and failures in one line.

Reaching a bucket or a Hub repo fails in a handful of ways that each have one fix: no credentials, no
network, access denied, no such bucket or repo, a gated dataset without an accepted token, HF_HUB_OFFLINE
set. `remote_problem` turns the exception (from botocore, s3fs, huggingface_hub, aiohttp, httpx...) into
that one line. Every URL in it is redacted: no `user:password@`, no query string (it may hold a signature).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

# Schemes whose fsspec file system takes no credentials from the URL: `s3://key:secret@bucket` is read as a
# bucket named "key:secret@bucket", and botocore then prints that name (with the secret) in its error.
NO_USERINFO_SCHEMES = ("s3", "s3a", "gs", "gcs", "hf")
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/@'\"<>]*@)?(?P<rest>[^\s?#'\"<>]*)"
                  r"(?P<query>\?[^\s#'\"<>]*)?")
# Exception class names (anywhere in the chain) that mean the host could not be reached at all.
UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ConnectError",
               "ConnectTimeout", "ClientConnectorError", "ClientConnectionError", "ServerDisconnectedError",
               "ProxyConnectionError", "gaierror", "ConnectionRefusedError", "ConnectionResetError"}
# Modules whose exceptions are failures of the remote side or of the way there, not bugs of ours.
REMOTE_MODULES = ("botocore", "aiobotocore", "boto3", "s3fs", "fsspec", "huggingface_hub", "aiohttp", "httpx",
                  "httpcore", "requests", "urllib3", "gcsfs", "google")


class RemoteError(ValueError):
    """A remote source that cannot be read; one line naming the URL (redacted) and the fix."""


def is_url(src: str) -> bool:
    """True for fsspec URLs such as s3://bucket/prefix or hf://datasets/...; local paths are not URLs."""
    return "://" in src and not src.startswith("file://")


def public_url(src: str) -> str:
    """`src` without user:password@ and without a query string, for logs and the manifest."""
    if not is_url(src):
        return src
    parts = urlsplit(src)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def redact(text: str, src: str | None = None) -> str:
    """`text` with every URL's user:password@ and query string removed, and `src`'s own user/password
    wherever else they appear (a library may quote them outside a URL)."""
    text = _URL.sub(lambda m: m["scheme"] + m["rest"], text)
    if src and is_url(src):
        parts = urlsplit(src)
        for secret in (parts.password, parts.username, parts.query):
            if secret:
                text = text.replace(secret, "***")
    return text


def check_url(src: str) -> None:
    """Refuse credentials in a URL whose file system would not use them (and would print them)."""
    parts = urlsplit(src)
    if "@" in parts.netloc and parts.scheme in NO_USERINFO_SCHEMES:
        fix = "log in with `hf auth login` or set HF_TOKEN" if parts.scheme == "hf" else \
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        raise RemoteError(f"--src {public_url(src)}: {parts.scheme}:// takes no credentials in the URL; remove the "
                          f"'user:...@' part and {fix}")


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen and len(seen) < 20:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def unreachable(exc: BaseException) -> bool:
    """True when `exc` (or what caused it) says the server could not be reached at all."""
    chain = _chain(exc)
    names = {cls.__name__ for e in chain for cls in type(e).__mro__}
    return bool(names & UNREACHABLE) or "TimeoutError" in names or any("ConnectTimeout" in str(e) for e in chain)


def _reason(exc: BaseException, src: str) -> str:
    """The innermost useful message of `exc`'s chain, on one line, redacted, at most 160 characters."""
    for e in reversed(_chain(exc)):
        text = " ".join(str(e).split())
        if text:
            text = redact(text, src)
            return text if len(text) <= 160 else text[:157] + "..."
    return type(exc).__name__


def _hf_repo(src: str) -> str:
    """hf://datasets/OWNER/NAME/... -> OWNER/NAME (or the whole path when it is not in that form)."""
    parts = urlsplit(src)
    path = [p for p in (parts.netloc + parts.path).split("/") if p]
    if path and path[0] in ("datasets", "spaces", "models"):
        path = path[1:]
    return "/".join(path[:2]).split("@")[0]


def remote_problem(exc: BaseException, src: str, flag: str = "--src") -> str | None:
    """One line saying why reading the remote `src` failed and what to do, or None when `exc` is not a
    failure to reach or read a remote source (a bug of ours: let it raise)."""
    if not is_url(src):
        return None
    chain = _chain(exc)
    names = {cls.__name__ for e in chain for cls in type(e).__mro__}
    modules = {type(e).__module__.split(".")[0] for e in chain}
    text = " ".join(str(e) for e in chain)
    status = next((getattr(getattr(e, "response", None), "status_code", None) for e in chain
                   if getattr(getattr(e, "response", None), "status_code", None)), None)
    scheme = urlsplit(src).scheme
    where = f"{flag} {public_url(src)}" if flag else public_url(src)
    hub = scheme == "hf"
    login = "log in with `hf auth login` (or set HF_TOKEN)"
    aws_keys = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE; or run `aws configure`)"

    if "OfflineModeIsEnabled" in names:
        return (f"{where}: HF_HUB_OFFLINE=1 is set, so the Hub cannot be reached; unset it, or download the data "
                f"once (`hf download {_hf_repo(src)} --repo-type dataset`) and pass the local folder as --src")
    if "GatedRepoError" in names:
        repo = _hf_repo(src)
        return (f"{where}: {repo} is a gated dataset and this machine has no token with access to it; accept its "
                f"terms at https://huggingface.co/datasets/{repo}, then {login}")
    if "RepositoryNotFoundError" in names or (hub and "repository not found" in text.lower()):
        return (f"{where}: no such repo on the Hub, or a private one this token cannot see; check the name "
                f"(hf://datasets/OWNER/NAME/PATH) or {login}")
    if names & {"NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError"}:
        return f"{where}: no AWS credentials found; {aws_keys}, or use an instance role"
    if unreachable(exc):
        endpoint = {"hf": ", and HF_ENDPOINT if set", "s3": ", and AWS_ENDPOINT_URL if set"}.get(scheme, "")
        return (f"{where}: cannot reach the server ({_reason(exc, src)}); check the network connection and "
                f"proxy{endpoint}, then re-run the same command")
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return (f"{where}: no such bucket; check the bucket name (and AWS_ENDPOINT_URL / the region if the "
                f"bucket is not on AWS)")
    if "PermissionError" in names or status in (401, 403) or re.search(
            r"AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|ExpiredToken|Forbidden", text):
        fix = (f"{login} with an account that can read it" if hub else
               f"use credentials allowed to list and read it (s3:ListBucket, s3:GetObject): {aws_keys}")
        return f"{where}: access denied ({_reason(exc, src)}); {fix}"
    if "FileNotFoundError" in names or status == 404:
        return f"{where}: not found ({_reason(exc, src)}); check the path"
    if modules & set(REMOTE_MODULES):
        return f"{where}: cannot read it ({type(exc).__name__}: {_reason(exc, src)})"
    return None


@contextmanager
def explained(src: str, flag: str = ""):
    """Turn a failure to read the remote `src` inside the block into a RemoteError with one line (also in a
    worker process: the library's own exception may not survive the trip back to the parent)."""
    try:
        yield
    except RemoteError:
        raise
    except Exception as exc:
        problem = remote_problem(exc, src, flag)
        if problem is None:
            raise
        raise RemoteError(problem) from exc
