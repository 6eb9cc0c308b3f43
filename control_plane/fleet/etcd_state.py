"""The state the admin API, drains and keys create, in etcd: several control planes share it.

One JSON document under `<prefix>state`, the same document the state file holds. A change is
read-modify-write with an etcd transaction that succeeds only if the document's revision is the
one the change was made on; otherwise the control plane takes the newer document and makes its
change again, so changes made on two control planes at once never lose each other. Every
control plane watches the key and applies what another one wrote, typically within
milliseconds. etcd unreachable: the last state keeps being served, and changes are refused
(StateUnavailable, the admin API's 503) until it answers again.

The members, resolved to IPv4 addresses at start, share one gRPC channel that moves to the next
member when one fails, so losing one member of three goes unnoticed.

TLS (`state.etcd_tls`, for etcd's --client-cert-auth): the channel is `grpc.aio.secure_channel`
with ca_file as its roots and cert_file/key_file as the client certificate (aetcd's Client only
dials insecure channels; `EtcdClient` below makes its own). The files are read once, when the
control plane starts: replacing them on a running plane changes nothing until it restarts.
Names: one channel spans every member (`ipv4:a:p,b:q,c:r`), and gRPC checks every member's
certificate against that channel's one authority, which for such a target is the whole list
("127.0.0.1:p,127.0.0.1:q" matches no certificate: "Hostname Verification Check failed"). So
the channel is given `grpc.ssl_target_name_override` = the host of state.etcd's first entry, as
written (a DNS name, or an address, checked against the certificates' IP names), and every
member's certificate must carry that name among its own; the control plane checks each member
it can reach when it starts and refuses to start on one whose certificate does not, rather
than lose that member quietly when the first one fails.

etcd's own users (`state.etcd_user`, the password from `state.etcd_password_env`): the client
authenticates when it connects and sends the token with each call. A new client (a member given
up, a token the member no longer knows: "invalid auth token") authenticates again. A wrong
password, or a user etcd refuses the state's keys, is said at once, not retried.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone

import aetcd
import aetcd.exceptions
import grpc
from aetcd import rpc
from aetcd.watcher import Watcher

from control_plane.addresses import is_ip_address
from control_plane.certificates import CertificateProblem, read_authority, read_pair
from control_plane.config import BackendTlsConfig

log = logging.getLogger(__name__)

RETRY_S = 0.5  # how soon a broken watch is made again
RETRY_CALL_S = 0.1  # between tries of one call
DOWN_TRY_S = 0.5  # how long a call may take while etcd is known to be away
# A control plane's lease: its leadership and its Envoy count go this long after it stops
# renewing (killed, cut off), so another takes over within about that.
LEASE_TTL_S = 3


class StateUnavailable(RuntimeError):
    """etcd cannot be reached (or did not answer in time): nothing was changed."""


class Conflict(RuntimeError):
    """Another control plane changed the state first."""


def resolve_members(endpoints: tuple[str, ...]) -> list[str]:
    """The members as IPv4:port; names (compose's service names) are resolved here, once."""
    addresses = []
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        if not is_ip_address(host):
            try:
                host = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
            except OSError as error:
                raise StateUnavailable(f"state.etcd: {host} does not resolve ({error})") from None
        addresses.append(f"{host}:{port}")
    return addresses


def channel_target(members: list[str]) -> tuple[str, int]:
    """aetcd dials `host:port`; gRPC's `ipv4:a:p,b:q` target lists every member instead, and its
    pick-first policy moves to the next one when the one in use refuses or drops connections."""
    *first, last = members
    host, _, port = last.rpartition(":")
    return "ipv4:" + ",".join([*first, host]), int(port)


class EtcdClient(aetcd.Client):
    """aetcd's Client on a channel made here: TLS with `credentials` when given (aetcd's own
    connect() dials only insecure channels). Otherwise its connect(), but a refused password is
    said as such (StateUnavailable, not retried), a failed one closes its channel, and a user
    etcd has no auth for (not enabled yet) goes on without a token, saying so."""

    def __init__(self, host: str, port: int, credentials: grpc.ChannelCredentials | None = None, **kwargs):
        super().__init__(host, port, **kwargs)
        self.credentials = credentials
        self.authenticated = False  # it has a token (a user is set and etcd's auth is on)

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:  # another task is connecting it
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        try:
            target, options = f"{self._host}:{self._port}", list(self._options.items())
            self.channel = grpc.aio.insecure_channel(target, options) if self.credentials is None else \
                grpc.aio.secure_channel(target, self.credentials, options)
            try:
                if self._username is not None:
                    await self._authenticate()
            except BaseException:
                channel, self.channel = self.channel, None
                await _quietly(channel.close())
                raise
            self.kvstub, self.clusterstub = rpc.KVStub(self.channel), rpc.ClusterStub(self.channel)
            self.leasestub, self.maintenancestub = rpc.LeaseStub(self.channel), rpc.MaintenanceStub(self.channel)
            self._watcher = Watcher(rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False

    async def _authenticate(self) -> None:
        self.auth_stub = rpc.AuthStub(self.channel)
        try:
            answer = await self.auth_stub.Authenticate(
                rpc.AuthenticateRequest(name=self._username, password=self._password), timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            details = error.details() or ""
            if "authentication is not enabled" in details:
                log.warning("state.etcd_user: etcd's auth is not enabled; going on without a token")
                return
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT and "authentication failed" in details:
                raise StateUnavailable(f"etcd refused user {self._username!r} ({details}): check state.etcd_user "
                                       "and the password in state.etcd_password_env") from None
            aetcd.exceptions._handle_exception(error)  # aetcd's errors, which calls try again
        self.metadata = (("token", answer.token),)
        self.authenticated = True


# etcd's answers to a token it no longer takes: a member that lost it (restarted, or 5 minutes
# unused there), or users and roles changed since it was made. A new one is asked for.
RENEW_TOKEN = ("invalid auth token", "revision of auth store is old", "user name is empty")


def _auth_refusal(error: BaseException) -> tuple[str, bool] | None:
    """When etcd refused a call for its auth: its details, and whether a new token may help."""
    cause = error.__cause__ if isinstance(error, aetcd.exceptions.ClientError) else error
    if not isinstance(cause, grpc.aio.AioRpcError):
        return None
    details = cause.details() or ""
    if any(reason in details for reason in RENEW_TOKEN) or cause.code() == grpc.StatusCode.UNAUTHENTICATED:
        return details, True
    if cause.code() == grpc.StatusCode.PERMISSION_DENIED:
        return details, False
    return None


class EtcdState:
    def __init__(self, endpoints: tuple[str, ...], prefix: str, timeout_s: float, *,
                 tls: BackendTlsConfig | None = None, user: str | None = None, password: str | None = None):
        self.members = resolve_members(endpoints)
        self.prefix = prefix.encode()
        self.key = self.prefix + b"state"
        self.audit_prefix = self.prefix + b"audit/"  # one key per audit record (operator/audit.py)
        self.timeout_s = timeout_s
        self.user, self.password = user, password
        # The name every member's certificate must carry (the module's docstring says why one).
        self.server_name = endpoints[0].rpartition(":")[0] if endpoints else None
        self.credentials = self._credentials(tls) if tls is not None else None
        self.reachable = True  # false from a call that found etcd away to the next that did not
        self.lease = None  # this control plane's, while presence() holds one
        self.envoys_total: int | None = None  # Envoys on every control plane, as last read
        self.client = self._connect()
        self._moved = asyncio.Event()  # set when the client is replaced: the watch moves with it

    def _credentials(self, tls: BackendTlsConfig) -> grpc.ChannelCredentials:
        """The TLS files, read and checked now, once: a rotated client certificate is taken at
        the next start (rotation on a running plane is not done). StateUnavailable says which
        file cannot serve, or which member's certificate does not name `server_name`."""
        try:
            ca = read_authority(tls.ca_file, "state.etcd_tls.ca_file").pem if tls.ca_file else None
            pair = read_pair(tls.cert_file, tls.key_file, "state.etcd_tls", datetime.now(timezone.utc)) \
                if tls.cert_file and tls.key_file else None
        except CertificateProblem as problem:
            raise StateUnavailable(str(problem)) from None
        context = ssl.create_default_context(cadata=ca.decode() if ca else None)  # else the system's CAs
        if pair is not None:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        self._check_names(context)
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=pair.key if pair else None,
                                            certificate_chain=pair.chain if pair else None)

    def _check_names(self, context: ssl.SSLContext) -> None:
        """Each member that answers shows a certificate the CA signed for `server_name`; one that
        is down is skipped (gRPC checks it when it is used), one that hangs is waited for up to
        2 s. Blocking, but once, at start."""
        for member in self.members:
            host, _, port = member.rpartition(":")
            try:
                with socket.create_connection((host, int(port)), timeout=min(self.timeout_s, 2)) as raw, \
                        context.wrap_socket(raw, server_hostname=self.server_name):
                    pass
            except ssl.SSLCertVerificationError as error:
                raise StateUnavailable(
                    f"state.etcd_tls: the certificate of the etcd member at {member} does not pass ({error.verify_message}); "
                    f"every member's must be signed by ca_file and name {self.server_name} (state.etcd's first "
                    "member, the name checked on all of them)") from None
            except ssl.SSLError as error:
                raise StateUnavailable(f"state.etcd_tls: no TLS with the etcd member at {member} ({error.reason}); "
                                       "does it serve https (--cert-file)?") from None
            except OSError:
                continue

    def _connect(self) -> EtcdClient:
        host, port = channel_target(self.members)
        options = {"grpc.initial_reconnect_backoff_ms": 200, "grpc.max_reconnect_backoff_ms": 1000}
        if self.credentials is not None and self.server_name:
            options["grpc.ssl_target_name_override"] = self.server_name
        return EtcdClient(host, port, self.credentials, username=self.user, password=self.password,
                          timeout=self.timeout_s, options=options)

    def _move_on(self) -> None:
        """The member in use holds calls without answering (hung, or cut off from the others): a
        new channel that tries the next member first. Pick-first would stay, as its connection
        is still open."""
        self.members = self.members[1:] + self.members[:1]
        self._replace()

    def _replace(self) -> None:
        """A new client (which authenticates again when it connects); the watch moves to it."""
        old, self.client = self.client, self._connect()
        self._moved.set()
        # Closed once the calls still on it have timed out: closing cancels them, and a cancelled
        # call would end the request that made it as if its client had gone.
        loop = asyncio.get_running_loop()
        loop.call_later(2 * self.timeout_s, lambda: loop.create_task(_quietly(old.close())))

    async def call(self, make: Callable[[], Awaitable]):
        """One call of `make` on the client, with this store's retries and timeout (for the usage
        records, fleet/usage_store.py)."""
        return await self._call(make)

    async def _call(self, make: Callable[[], Awaitable]):
        """One etcd call, tried again until `timeout_s` x 2 has passed: a member lost makes the
        next call wait for etcd's election (about a second), which nobody should notice. While
        etcd is known to be away, one short try: nothing waits on it for long."""
        loop = asyncio.get_running_loop()
        budget = 2 * self.timeout_s if self.reachable else min(self.timeout_s, DOWN_TRY_S)
        deadline = loop.time() + budget
        while True:
            try:
                try:
                    result = await asyncio.wait_for(make(), max(0.05, min(self.timeout_s, deadline - loop.time())))
                except asyncio.CancelledError:
                    if asyncio.current_task().cancelling():
                        raise  # this call's caller is being cancelled
                    raise OSError("the call was cancelled under it (its channel closed)") from None
                if not self.reachable:
                    log.info("etcd answers again")
                self.reachable = True
                return result
            except (asyncio.TimeoutError, aetcd.exceptions.ClientError, grpc.RpcError, OSError) as error:
                log.debug("etcd call failed: %r", error)
                if isinstance(error, asyncio.TimeoutError) and len(self.members) > 1:
                    self._move_on()
                elif self.user is not None and (refusal := _auth_refusal(error)) is not None:
                    details, renew = refusal
                    if not renew and self.client.authenticated:
                        raise StateUnavailable(f"etcd refused user {self.user!r} ({details}): grant it readwrite "
                                               f"on the keys under {self.prefix.decode()!r}") from None
                    self._replace()  # a new client, which authenticates (again) when it connects
                if loop.time() + RETRY_CALL_S >= deadline:
                    if self.reachable:
                        log.warning("etcd does not answer (%s): serving the last state, refusing changes", error)
                    self.reachable = False
                    raise StateUnavailable(f"etcd does not answer ({type(error).__name__}); the gateway keeps serving "
                                           "its last state, and changes wait until etcd is back") from None
                await asyncio.sleep(RETRY_CALL_S)

    async def load(self) -> tuple[dict | None, int]:
        """The document and its revision (0: none yet)."""
        found = await self._call(lambda: self.client.get(self.key))
        if found is None:
            return None, 0
        return _parse(found.value), found.mod_revision

    async def save(self, data: dict, revision: int) -> int:
        """Writes `data` if the document is still at `revision`; the new revision, else Conflict."""
        txn = self.client.transactions
        body = json.dumps(data, sort_keys=True).encode()
        succeeded, responses = await self._call(lambda: self.client.transaction(
            compare=[txn.mod(self.key) == revision], success=[txn.put(self.key, body)], failure=[]))
        if not succeeded:
            raise Conflict("the state changed on another control plane")
        return responses[0].response_put.header.revision

    async def follow(self, revision: int, on_change: Callable[[dict, int], Awaitable[None]]) -> None:
        """Calls `on_change(document, revision)` for each version newer than `revision`, for ever;
        a broken watch, or one on a member given up (`_move_on`), is made again from where it
        stopped (a read first catches up)."""
        seen = [revision]
        while True:
            events = moved = None
            try:
                data, latest = await self.load()
                if latest > seen[0] and data is not None:
                    await on_change(data, latest)
                    seen[0] = latest
                self._moved = asyncio.Event()
                events = asyncio.create_task(self._events(seen, on_change))
                moved = asyncio.create_task(self._moved.wait())
                await asyncio.wait({events, moved}, return_when=asyncio.FIRST_COMPLETED)
                if events.done():
                    events.result()  # its error, if any, is logged below
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - etcd away, a member gone: catch up and watch again
                log.debug("etcd watch ended (%s); watching again", error)
            finally:
                for task in (events, moved):
                    if task is not None:
                        task.cancel()
            await asyncio.sleep(RETRY_S)

    async def _events(self, seen: list[int], on_change: Callable[[dict, int], Awaitable[None]]) -> None:
        async for event in await self.client.watch(self.key, start_revision=seen[0] + 1):
            if event.kv.mod_revision > seen[0] and event.kv.value:
                await on_change(_parse(event.kv.value), event.kv.mod_revision)
                seen[0] = event.kv.mod_revision  # only once applied: a failure is tried again

    async def presence(self, plane_id: str, on_leading: Callable[[bool], Awaitable[None]],
                       own_envoys: Callable[[], int]) -> None:
        """For ever: keeps this control plane's lease, and makes it the leader (the one that runs
        DNS discovery, finishes drains and expires key secrets) whenever no other one is.
        `on_leading(True/False)` is called when that changes. Each second it also writes how many
        Envoys are connected here and reads the sum over every plane (`envoys_total`): quotas are
        split among all of them. None of this waits in the load loop."""
        txn = self.client.transactions
        leader_key, envoys_prefix = self.prefix + b"leader", self.prefix + b"envoys/"
        leading, written = False, None
        while True:
            try:
                self.lease = await self._call(lambda: self.client.lease(LEASE_TTL_S))
                written = None
                while True:
                    if not leading:
                        # The key is ours if it was made now, or by a try of ours whose answer was lost.
                        made, answers = await self._call(lambda: self.client.transaction(
                            compare=[txn.create(leader_key) == 0],
                            success=[txn.put(leader_key, plane_id.encode(), lease=self.lease)],
                            failure=[txn.get(leader_key)]))
                        holder = answers[0][0][0] if not made and answers and answers[0] else None
                        if made or holder == plane_id.encode():
                            leading = True
                            log.info("leading: this control plane runs DNS discovery and finishes drains")
                            await self._tell(on_leading, True)
                    if (count := own_envoys()) != written:
                        await self._call(lambda: self.client.put(envoys_prefix + plane_id.encode(),
                                                                 str(count).encode(), lease=self.lease))
                        written = count
                    found = await self._call(lambda: self.client.get_prefix(envoys_prefix))
                    self.envoys_total = sum(int(kv.value) for kv in found)
                    await asyncio.sleep(LEASE_TTL_S / 3)
                    answer = await self._call(lambda: self.client.refresh_lease(self.lease.id))
                    if getattr(answer, "TTL", 1) <= 0:
                        raise StateUnavailable("the lease expired")
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - lease lost or etcd away: step down, try again
                log.debug("presence: %r", error)
                self.lease = None
                if leading:
                    leading = False
                    log.warning("no longer leading (%s)", error)
                    await self._tell(on_leading, False)
                await asyncio.sleep(RETRY_S)

    @staticmethod
    async def _tell(on_leading: Callable[[bool], Awaitable[None]], leading: bool) -> None:
        """A failure there must not end the presence loop (no plane would lead again)."""
        try:
            await on_leading(leading)
        except Exception:  # noqa: BLE001
            log.exception("acting on leadership (%s) failed", leading)

    async def step_down(self) -> None:
        """Gives up the lease at once (a clean stop): another control plane leads without waiting."""
        if self.lease is not None:
            try:
                await asyncio.wait_for(self.lease.revoke(), self.timeout_s)
            except Exception:  # noqa: BLE001 - it expires anyway
                pass

    async def close(self) -> None:
        await self.client.close()

    # -- the audit trail (control_plane/operator/audit.py): one key per record, <prefix>audit/<id>,
    # ids that sort by time, so the records of every control plane make one ordered trail.

    async def _audit_range(self, start: bytes, limit: int = 0, descend: bool = False, keys_only: bool = False,
                           count_only: bool = False):
        """A Range over the audit keys from `start`, which aetcd's get_range cannot limit."""
        from aetcd.utils import prefix_range_end

        prefix = self.audit_prefix
        order = rpc.RangeRequest.DESCEND if descend else rpc.RangeRequest.ASCEND
        request = rpc.RangeRequest(key=start, range_end=prefix_range_end(prefix), limit=limit,
                                        sort_order=order, sort_target=rpc.RangeRequest.KEY,
                                        keys_only=keys_only, count_only=count_only)

        async def call():
            client = self.client
            await client.connect()
            return await client.kvstub.Range(request, timeout=self.timeout_s, metadata=client.metadata)
        return await self._call(call)

    async def add_audit_record(self, record_id: str, value: bytes, keep: int, slack: int) -> None:
        """Writes one record; once there are `slack` more than `keep`, the oldest beyond `keep` go.
        Trimming that fails is left to the next record."""
        prefix = self.audit_prefix
        await self._call(lambda: self.client.put(prefix + record_id.encode(), value))
        try:
            count = (await self._audit_range(prefix, count_only=True)).count
            if count > keep + slack:
                oldest = await self._audit_range(prefix, limit=count - keep, keys_only=True)
                if oldest.kvs:
                    last = oldest.kvs[-1].key
                    await self._call(lambda: self.client.delete_range(prefix, last + b"\0"))
        except StateUnavailable as error:
            log.debug("audit trail not trimmed: %s", error)

    async def audit_records(self, since: str | None, limit: int) -> tuple[list[bytes], bool]:
        """With `since`, the first `limit` records whose id is at or after it; without, the newest
        `limit`, oldest first. And whether more were left out."""
        prefix = self.audit_prefix
        if since is not None:
            found = await self._audit_range(prefix + since.encode(), limit=limit + 1)
            values = [kv.value for kv in found.kvs]
            return values[:limit], len(values) > limit
        found = await self._audit_range(prefix, limit=limit + 1, descend=True)
        values = [kv.value for kv in found.kvs]
        return list(reversed(values[:limit])), len(values) > limit


async def _quietly(closing: Awaitable) -> None:
    try:
        await closing
    except Exception:  # noqa: BLE001 - a channel to a dead member may fail to close; nobody waits
        pass


def _parse(value: bytes) -> dict:
    data = json.loads(value)
    if not isinstance(data, dict):
        raise ValueError("the state in etcd is not a JSON object")
    return data
