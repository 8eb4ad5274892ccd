"""Named limits of the ICAP parser, each with the reason for its size.

Every limit protects the gateway's memory from a peer: a proxy that is buggy
or an attacker who reaches the port.  Crossing one answers ``400 Bad Request``
and closes the connection, since the stream can no longer be framed safely.
"""

# An ICAP request head (request line + ICAP headers) from Squid is a few
# hundred bytes; c-icap caps it at 8 KiB per line.  64 KiB leaves room for
# large X-* metadata headers while bounding what we buffer before framing.
MAX_ICAP_HEAD_SIZE = 64 * 1024

# Squid sends about a dozen ICAP headers; 100 is generous and bounds the
# per-request dict building a hostile peer could force.
MAX_ICAP_HEADERS = 100

# The encapsulated HTTP header blocks (req-hdr + res-hdr).  Squid's defaults
# cap request and reply headers at 64 KiB each (request_header_max_size,
# reply_header_max_size); 256 KiB covers both with room for raised limits.
MAX_ENCAPSULATED_HEAD_SIZE = 256 * 1024

# HTTP headers inside one encapsulated block; Squid's own limit is about 100
# per message by default, big sites send 40 or so.
MAX_HTTP_HEADERS = 256

# A chunk-size line: up to 16 hex digits plus extensions ("; ieof").  1 KiB
# is far more than any honest client sends and stops a line without CRLF
# from growing the buffer.
MAX_CHUNK_SIZE_LINE = 1024

# Trailer section after the last chunk (rarely used in ICAP).
MAX_TRAILER_SIZE = 16 * 1024

# Largest chunk size we accept: 2**62 fits a Python int trivially, but a
# size that overflows a C off_t in the peer is a sign of a broken stream.
MAX_CHUNK_SIZE = 2**62

# The URL of an encapsulated HTTP request (its target, or Host plus path).
# Common proxies and servers refuse longer ones (Squid's default request
# line limit is near 8 KiB, nginx's large_client_header_buffers 8 KiB), and
# the URL is copied into scan contexts, logs and the register: past this it
# is refused with 400 rather than carried around.
MAX_URL_LENGTH = 8 * 1024

# An OPTIONS request's body (opt-body): RFC 3507 leaves its format open and
# nothing sends one (Squid, c-icap-client do not).  It is read before the
# answer and by anyone, key or not: without a cap a peer sending one at the
# minimum body rate held its connection for ever.  Past this: 400.
MAX_OPTIONS_BODY = 64 * 1024

# The ICAP core remembers the parse of request lines, which a proxy repeats
# on every request to a service (see connection._Memo): at most this many,
# of at most this many bytes each, 256 KiB in all, whatever a peer sends.
# A proxy's few services fit many times over.
MEMO_ENTRIES = 512
MEMO_KEY_MAX = 512
