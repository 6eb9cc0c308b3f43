-- whisper-gateway: API keys, checked in Envoy with no call out of the request path.
--
-- The control plane keeps only each key's SHA-256 (control_plane/tenants/keys.py) and pushes
-- them as KEY_GRANTS[<hex digest>] = {id, models}, a table it writes ahead of this source
-- (control_plane/builders/routes.py), so neither its state file nor Envoy's config holds a secret. Envoy's Lua has no hash function, so
-- SHA-256 is here (FIPS 180-4, on LuaJIT's 32-bit `bit` operations); each worker remembers the
-- digests of the secrets it saw lately, so a client's key is hashed once, not per request.

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

-- The grant {id, models} of the request's `Authorization: Bearer <key>`, or nil and why not
-- (OpenAI's wording; the key itself is never echoed, so it reaches no log).
local function authenticate(headers)
  local given = headers:get("authorization")
  local secret = given and given:match("^%s*[Bb][Ee][Aa][Rr][Ee][Rr]%s+(%S+)%s*$")
  if secret == nil then
    return nil, "You didn't provide an API key. You need to provide your API key in an Authorization header "
      .. "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
  end
  local grant = #secret <= MAX_SECRET_BYTES and KEY_GRANTS[digest_of(secret)] or nil
  if grant == nil then
    return nil, "Incorrect API key provided. Ask the gateway's operator for a valid key."
  end
  return grant, nil
end

-- Whether a grant may use `model` (a grant without a model list may use all).
local function allows(grant, model)
  if grant.models == nil then return true end
  for _, allowed in ipairs(grant.models) do
    if allowed == model then return true end
  end
  return false
end
