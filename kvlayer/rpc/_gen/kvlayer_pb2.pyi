from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KeyList(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[str]] = ...) -> None: ...

class TokenPrefix(_message.Message):
    __slots__ = ("namespace", "tokens", "chunk_size", "full_only")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    FULL_ONLY_FIELD_NUMBER: _ClassVar[int]
    namespace: bytes
    tokens: _containers.RepeatedScalarFieldContainer[int]
    chunk_size: int
    full_only: bool
    def __init__(self, namespace: _Optional[bytes] = ..., tokens: _Optional[_Iterable[int]] = ..., chunk_size: _Optional[int] = ..., full_only: _Optional[bool] = ...) -> None: ...

class Target(_message.Message):
    __slots__ = ("keys", "prefix", "doc_id")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    keys: KeyList
    prefix: TokenPrefix
    doc_id: str
    def __init__(self, keys: _Optional[_Union[KeyList, _Mapping]] = ..., prefix: _Optional[_Union[TokenPrefix, _Mapping]] = ..., doc_id: _Optional[str] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("status", "version", "uptime_s", "pid")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[HealthResponse.Status]
        SERVING: _ClassVar[HealthResponse.Status]
        NOT_SERVING: _ClassVar[HealthResponse.Status]
    UNKNOWN: HealthResponse.Status
    SERVING: HealthResponse.Status
    NOT_SERVING: HealthResponse.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    status: HealthResponse.Status
    version: str
    uptime_s: float
    pid: int
    def __init__(self, status: _Optional[_Union[HealthResponse.Status, str]] = ..., version: _Optional[str] = ..., uptime_s: _Optional[float] = ..., pid: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("name", "kind", "capacity_bytes", "used_bytes", "num_keys", "hits", "misses", "puts", "bytes_read", "bytes_written", "evictions", "errors", "corrupt", "dropped_writes", "available", "misplaced")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_KEYS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    PUTS_FIELD_NUMBER: _ClassVar[int]
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_FIELD_NUMBER: _ClassVar[int]
    DROPPED_WRITES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    MISPLACED_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    capacity_bytes: int
    used_bytes: int
    num_keys: int
    hits: int
    misses: int
    puts: int
    bytes_read: int
    bytes_written: int
    evictions: int
    errors: int
    corrupt: int
    dropped_writes: int
    available: bool
    misplaced: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., num_keys: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., puts: _Optional[int] = ..., bytes_read: _Optional[int] = ..., bytes_written: _Optional[int] = ..., evictions: _Optional[int] = ..., errors: _Optional[int] = ..., corrupt: _Optional[int] = ..., dropped_writes: _Optional[int] = ..., available: _Optional[bool] = ..., misplaced: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("tiers", "counters", "tenant", "tenant_keys")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TIERS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TENANT_KEYS_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    counters: _containers.ScalarMap[str, int]
    tenant: str
    tenant_keys: int
    def __init__(self, tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., counters: _Optional[_Mapping[str, int]] = ..., tenant: _Optional[str] = ..., tenant_keys: _Optional[int] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("target",)
    TARGET_FIELD_NUMBER: _ClassVar[int]
    target: Target
    def __init__(self, target: _Optional[_Union[Target, _Mapping]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("hit_chunks", "tiers", "hit_tokens", "num_chunks")
    HIT_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    hit_chunks: int
    tiers: _containers.RepeatedScalarFieldContainer[str]
    hit_tokens: int
    num_chunks: int
    def __init__(self, hit_chunks: _Optional[int] = ..., tiers: _Optional[_Iterable[str]] = ..., hit_tokens: _Optional[int] = ..., num_chunks: _Optional[int] = ...) -> None: ...

class ExistsRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[str]] = ...) -> None: ...

class ExistsResponse(_message.Message):
    __slots__ = ("exists",)
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    exists: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, exists: _Optional[_Iterable[bool]] = ...) -> None: ...

class PutFrame(_message.Message):
    __slots__ = ("key", "total_len", "data", "durable")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LEN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    key: str
    total_len: int
    data: bytes
    durable: bool
    def __init__(self, key: _Optional[str] = ..., total_len: _Optional[int] = ..., data: _Optional[bytes] = ..., durable: _Optional[bool] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("stored", "bytes")
    STORED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    stored: _containers.RepeatedScalarFieldContainer[bool]
    bytes: int
    def __init__(self, stored: _Optional[_Iterable[bool]] = ..., bytes: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("keys", "promote")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    PROMOTE_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    promote: bool
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., promote: _Optional[bool] = ...) -> None: ...

class GetFrame(_message.Message):
    __slots__ = ("index", "found", "total_len", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LEN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    found: bool
    total_len: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., found: _Optional[bool] = ..., total_len: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("target", "ttl_s")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    target: Target
    ttl_s: float
    def __init__(self, target: _Optional[_Union[Target, _Mapping]] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("lease_id", "num_keys")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_KEYS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    num_keys: int
    def __init__(self, lease_id: _Optional[str] = ..., num_keys: _Optional[int] = ...) -> None: ...

class UnpinRequest(_message.Message):
    __slots__ = ("lease_id", "doc_id")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    doc_id: str
    def __init__(self, lease_id: _Optional[str] = ..., doc_id: _Optional[str] = ...) -> None: ...

class UnpinResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("target", "force")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    target: Target
    force: bool
    def __init__(self, target: _Optional[_Union[Target, _Mapping]] = ..., force: _Optional[bool] = ...) -> None: ...

class EvictResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...

class ClearRequest(_message.Message):
    __slots__ = ("all_tenants",)
    ALL_TENANTS_FIELD_NUMBER: _ClassVar[int]
    all_tenants: bool
    def __init__(self, all_tenants: _Optional[bool] = ...) -> None: ...

class ClearResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...

class RegisterDocumentRequest(_message.Message):
    __slots__ = ("doc_id", "keys", "tokens")
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    doc_id: str
    keys: KeyList
    tokens: TokenPrefix
    def __init__(self, doc_id: _Optional[str] = ..., keys: _Optional[_Union[KeyList, _Mapping]] = ..., tokens: _Optional[_Union[TokenPrefix, _Mapping]] = ...) -> None: ...

class RegisterDocumentResponse(_message.Message):
    __slots__ = ("num_keys",)
    NUM_KEYS_FIELD_NUMBER: _ClassVar[int]
    num_keys: int
    def __init__(self, num_keys: _Optional[int] = ...) -> None: ...

class KeysRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class KeysResponse(_message.Message):
    __slots__ = ("keys", "truncated")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    truncated: bool
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., truncated: _Optional[bool] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("max_keys", "all_tenants")
    MAX_KEYS_FIELD_NUMBER: _ClassVar[int]
    ALL_TENANTS_FIELD_NUMBER: _ClassVar[int]
    max_keys: int
    all_tenants: bool
    def __init__(self, max_keys: _Optional[int] = ..., all_tenants: _Optional[bool] = ...) -> None: ...

class StoreEvent(_message.Message):
    __slots__ = ("seq", "kind", "tier", "medium", "keys", "reason", "ts", "dropped")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[StoreEvent.Kind]
        STORED: _ClassVar[StoreEvent.Kind]
        REMOVED: _ClassVar[StoreEvent.Kind]
        CLEARED: _ClassVar[StoreEvent.Kind]
        SUBSCRIBED: _ClassVar[StoreEvent.Kind]
    UNKNOWN: StoreEvent.Kind
    STORED: StoreEvent.Kind
    REMOVED: StoreEvent.Kind
    CLEARED: StoreEvent.Kind
    SUBSCRIBED: StoreEvent.Kind
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    MEDIUM_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    seq: int
    kind: StoreEvent.Kind
    tier: str
    medium: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    ts: float
    dropped: int
    def __init__(self, seq: _Optional[int] = ..., kind: _Optional[_Union[StoreEvent.Kind, str]] = ..., tier: _Optional[str] = ..., medium: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ..., ts: _Optional[float] = ..., dropped: _Optional[int] = ...) -> None: ...
