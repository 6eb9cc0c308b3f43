-- whisper-gateway: API keys, checked in Envoy with no call out of the request path.
--
-- The control plane keeps only each key's SHA-256 (control_plane/tenants/keys.py) and pushes
-- them as KEY_GRANTS[<hex digest>] = {id, models}, a table it writes ahead of this source
-- (control_plane/builders/lua_source.py), so neither its state file nor Envoy's config holds a
-- secret. Envoy's Lua has no hash function, so SHA-256 is here (FIPS 180-4, on LuaJIT's 32-bit
-- `bit` operations); each worker remembers the digests of the secrets it saw lately, so a client's
-- key is hashed once, not per request.

local reply = openai_errors.reply
local bit = require("bit")
local band, bor, bxor, bnot, rshift, lshift, ror, tobit, tohex =
  bit.band, bit.bor, bit.bxor, bit.bnot, bit.rshift, bit.lshift, bit.ror, bit.tobit, bit.tohex

local SHA256_K = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
}

-- The digest of `message` as 64 lowercase hex digits.
local function sha256_hex(message)
  local length = #message
  local bits = length * 8
  local padded = message .. "\128" .. string.rep("\0", (55 - length) % 64)
    .. string.char(0, 0, 0, math.floor(bits / 2^32) % 256,
      math.floor(bits / 2^24) % 256, math.floor(bits / 2^16) % 256, math.floor(bits / 2^8) % 256, bits % 256)
  local h0, h1, h2, h3 = 0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a
  local h4, h5, h6, h7 = 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19
  local w = {}
  for block = 1, #padded, 64 do
    for i = 0, 15 do
      local b1, b2, b3, b4 = string.byte(padded, block + i * 4, block + i * 4 + 3)
      w[i] = bor(lshift(b1, 24), lshift(b2, 16), lshift(b3, 8), b4)
    end
    for i = 16, 63 do
      local x, y = w[i - 15], w[i - 2]
      local s0 = bxor(ror(x, 7), ror(x, 18), rshift(x, 3))
      local s1 = bxor(ror(y, 17), ror(y, 19), rshift(y, 10))
      w[i] = tobit(w[i - 16] + s0 + w[i - 7] + s1)
    end
    local a, b, c, d, e, f, g, h = h0, h1, h2, h3, h4, h5, h6, h7
    for i = 0, 63 do
      local t1 = tobit(h + bxor(ror(e, 6), ror(e, 11), ror(e, 25)) + bxor(band(e, f), band(bnot(e), g))
        + SHA256_K[i + 1] + w[i])
      local t2 = tobit(bxor(ror(a, 2), ror(a, 13), ror(a, 22)) + bxor(band(a, b), band(a, c), band(b, c)))
      h, g, f, e, d, c, b, a = g, f, e, tobit(d + t1), c, b, a, tobit(t1 + t2)
    end
    h0, h1, h2, h3 = tobit(h0 + a), tobit(h1 + b), tobit(h2 + c), tobit(h3 + d)
    h4, h5, h6, h7 = tobit(h4 + e), tobit(h5 + f), tobit(h6 + g), tobit(h7 + h)
  end
  return tohex(h0) .. tohex(h1) .. tohex(h2) .. tohex(h3) .. tohex(h4) .. tohex(h5) .. tohex(h6) .. tohex(h7)
end

-- Digests of secrets this worker saw lately; emptied when full, so a flood of made-up keys
-- costs memory for at most DIGESTS_KEPT of them.
local DIGESTS_KEPT = 4096
local MAX_SECRET_BYTES = 256
local digests, digests_count = {}, 0

local function digest_of(secret)
  local known = digests[secret]
  if known then return known end
  if digests_count >= DIGESTS_KEPT then digests, digests_count = {}, 0 end
  known = sha256_hex(secret)
  digests[secret], digests_count = known, digests_count + 1
  return known
end

-- The grant {id, models} of the request's `Authorization: Bearer <key>`, or nil, why not (OpenAI's
-- wording; the key itself is never echoed, so it reaches no log) and whether a key was given at all.
local function authenticate(headers)
  local given = headers:get("authorization")
  local secret = given and given:match("^%s*[Bb][Ee][Aa][Rr][Ee][Rr]%s+(%S+)%s*$")
  if secret == nil then
    return nil, "You didn't provide an API key. You need to provide your API key in an Authorization header "
      .. "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).", false
  end
  local grant = #secret <= MAX_SECRET_BYTES and KEY_GRANTS[digest_of(secret)] or nil
  if grant == nil then
    return nil, "Incorrect API key provided. Ask the gateway's operator for a valid key.", true
  end
  return grant, nil, false
end

-- Guessing keys: a client address that sent CONTEXT.bad_keys_per_address wrong keys (0: no limit)
-- within a fixed window of CONTEXT.bad_key_window_s, which starts at its first wrong key, gets 429
-- rather than 401 until that window ends. Only requests without a valid key are refused so: a
-- valid key from the same address still passes, since an office or a carrier's NAT puts many
-- clients behind one address, and one guessing there must not lock the others out. Only wrong
-- keys count (a missing one guesses nothing), but once the address is over, a missing key gets
-- the 429 too. The key is still hashed (digest_of) to tell a valid one from a guess.
-- The counts are this worker's: Envoy runs one Lua state per worker thread (--concurrency), so an
-- address may send up to threshold x workers wrong keys per window, spread over connections;
-- and a new route configuration (a key made or revoked, a model added) compiles this source
-- afresh, counts emptied. They cost no call out of the request path, and bounded memory: the
-- table of addresses drops its expired windows when it holds ADDRESSES_KEPT, and is emptied
-- when more than half of them are current (a flood from that many addresses at once).
local ADDRESSES_KEPT = 8192
local bad_key_windows, bad_key_addresses = {}, 0 -- address -> {ends (ms), wrong keys in the window}

-- What wrong keys are counted against, from Envoy's "1.2.3.4:5678" or "[2001:db8::1]:5678": the
-- IP without its port; for IPv6, its /64, which is one subscriber's (who could otherwise take a
-- fresh address for each guess), as "2001:db8:0:0::/64".
local function address_key(address)
  local v6 = address:match("^%[(.+)%]:%d+$")
  if v6 == nil then return address:match("^(.+):%d+$") or address end
  local mapped = v6:match("^::[Ff][Ff][Ff][Ff]:(%d+%.%d+%.%d+%.%d+)$")
  if mapped then return mapped end
  v6 = v6:gsub("%%.*$", "") -- a zone (fe80::1%eth0)
  local head, tail = v6:match("^(.-)::(.*)$")
  local groups = {}
  for group in (head or v6):gmatch("[^:]+") do groups[#groups + 1] = group end
  if head and #groups < 4 then
    local right = {}
    for group in tail:gmatch("[^:]+") do right[#right + 1] = group end
    for _ = 1, 8 - #groups - #right do groups[#groups + 1] = "0" end
    for _, group in ipairs(right) do groups[#groups + 1] = group end
  end
  return string.lower(table.concat({groups[1] or "0", groups[2] or "0", groups[3] or "0", groups[4] or "0"}, ":"))
    .. "::/64"
end

-- The client's address (the peer's: the listener has use_remote_address and trusts no X-Forwarded-For).
local function client_address(h)
  return address_key(h:streamInfo():downstreamRemoteAddress() or "")
end

local function forget_expired_windows(now)
  local kept = 0
  for address, window in pairs(bad_key_windows) do
    if now >= window[1] then bad_key_windows[address] = nil else kept = kept + 1 end
  end
  if kept > ADDRESSES_KEPT / 2 then bad_key_windows, kept = {}, 0 end
  bad_key_addresses = kept
end

-- After a request without a valid key (`wrong`: it gave one; false: it gave none): the whole
-- seconds until its address's window ends when the address is over its wrong keys (answer 429),
-- else nil (answer 401). Counts `wrong` ones.
local function bad_key_wait(h, wrong)
  local limit = CONTEXT.bad_keys_per_address or 0
  if limit <= 0 then return nil end
  -- h:timestamp(): ms of the wall clock; a window ending further off than a whole one is left from
  -- a step back of the clock, and starts again.
  local address, now = client_address(h), h:timestamp()
  local window_ms = (CONTEXT.bad_key_window_s or 10) * 1000
  local window = bad_key_windows[address]
  if window == nil or now >= window[1] or window[1] - now > window_ms then
    if not wrong then return nil end
    if window == nil then
      if bad_key_addresses >= ADDRESSES_KEPT then forget_expired_windows(now) end
      bad_key_addresses = bad_key_addresses + 1
    end
    window = {now + window_ms, 0}
    bad_key_windows[address] = window
  end
  if window[2] >= limit then return math.max(1, math.ceil((window[1] - now) / 1000)) end
  if wrong then window[2] = window[2] + 1 end
  return nil
end

-- Whether a grant may use `model` (a grant without a model list may use all).
local function allows(grant, model)
  if grant.models == nil then return true end
  for _, allowed in ipairs(grant.models) do
    if allowed == model then return true end
  end
  return false
end

-- The key step: the request's grant, or false where keys are not required; nil once it answered
-- (401, or 429 to an address guessing keys).
local function admit(h, headers)
  if not CONTEXT.keys_required then return false end
  local grant, why, wrong = authenticate(headers)
  if grant ~= nil then return grant end
  -- An address guessing keys gets 429 until its window ends; its valid keys still pass (bad_key_wait).
  local wait = bad_key_wait(h, wrong)
  if wait then
    return reply(h, 429, "Too many requests with a wrong API key from this address; send a valid key, "
      .. "or wait " .. wait .. " s.", "bad_api_keys", nil, "too_many_bad_keys", wait)
  end
  return reply(h, 401, why, "AuthenticationError", nil, "invalid_api_key")
end

-- address_key: for tests/test_bad_keys.py, which runs it in a bare Envoy.
return {admit = admit, allows = allows, address_key = address_key}
