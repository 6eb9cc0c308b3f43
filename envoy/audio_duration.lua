-- whisper-gateway: how many seconds of audio an upload holds, read from its container's header.
--
-- Whisper's work is audio-seconds, not requests. The filter that holds each upload reads the
-- duration from small slices of the file part (its first few KiB, a box or page header, its
-- last few KiB), never the whole body and never by decoding. Layouts: WAV, FLAC, MP3 (Xing/Info
-- with LAME's delay and padding, VBRI, else constant bitrate), Ogg Opus and Vorbis, MP4/M4A/MOV
-- (`mvhd`, wherever `moov` is), WebM/Matroska (Segment Info Duration). Anything else, or a
-- header that cannot be trusted, is estimated from the size and a per-format bitrate, and says
-- so. A lying header never routes as huge: sizes are clamped to the bytes sent, and a result
-- that is not a positive number under the limit falls back to the estimate.

local byte, sub, find, floor = string.byte, string.sub, string.find, math.floor
local HEAD = 4096
local TAIL_FIRST, TAIL_MAX = 8192, 65536

-- Bits per second of audio by format, for estimates (a size/bitrate guess, marked as one).
local ESTIMATE_BPS = {wav = 256000, flac = 400000, mp3 = 128000, ogg = 48000, mp4 = 128000,
  webm = 48000, aac = 128000, amr = 12200, other = 128000}
local EXTENSIONS = {wav = "wav", wave = "wav", flac = "flac", mp3 = "mp3", mpga = "mp3", mpeg = "mp3",
  ogg = "ogg", oga = "ogg", opus = "ogg", m4a = "mp4", mp4 = "mp4", mov = "mp4", webm = "webm",
  mkv = "webm", aac = "aac", amr = "amr"}

local function u16le(s, i) local a, b = byte(s, i, i + 1); return a + b * 256 end
local function u32le(s, i) local a, b, c, d = byte(s, i, i + 3); return a + b * 256 + c * 65536 + d * 16777216 end
local function u32be(s, i) local a, b, c, d = byte(s, i, i + 3); return ((a * 256 + b) * 256 + c) * 256 + d end
local function u64le(s, i) return u32le(s, i) + u32le(s, i + 4) * 4294967296 end
local function u64be(s, i) return u32be(s, i) * 4294967296 + u32be(s, i + 4) end

-- A view of the file part: peek(offset, n) returns up to n bytes at a 0-based offset.
local function view(read, size)
  local head = read(0, math.min(size, HEAD))
  return function(offset, n)
    if offset < 0 or offset >= size then return "" end
    n = math.min(n, size - offset)
    if offset + n <= #head then return sub(head, offset + 1, offset + n) end
    return read(offset, n)
  end, head
end

-- Sample formats whose frame is channels x bytes per sample: PCM, IEEE float, A-law, mu-law.
local WAV_SAMPLE_FORMATS = {[1] = true, [3] = true, [6] = true, [7] = true}

-- The bytes a second of the `fmt ` chunk's audio takes as decoders play it, and whether that was
-- checked: for sample formats, rate x channels x bytes per sample, whatever the byte-rate field
-- says (a client can set it to anything); for coded ones (ADPCM, GSM: a block holds many
-- samples) only the byte-rate field, a claim the engine's own figure must confirm.
local function wav_rate(fmt)
  local tag, channels, rate, byte_rate, bits = u16le(fmt, 1), u16le(fmt, 3), u32le(fmt, 5), u32le(fmt, 9),
    u16le(fmt, 15)
  if tag == 0xFFFE and #fmt >= 26 then tag = u16le(fmt, 25) end -- extensible: the subformat's code
  if WAV_SAMPLE_FORMATS[tag] then return rate * channels * math.ceil(bits / 8), byte_rate, true end
  return byte_rate, byte_rate, false
end

-- Decoders time PCM by its sample rate and frame size, not by the byte-rate field, which is
-- only the container's claim.
local function wav(peek, head, size)
  local riff = sub(head, 1, 4)
  local offset, frame_rate, byte_rate, checked, ds64_data = 12, nil, nil, false, nil
  for _ = 1, 64 do
    local chunk = peek(offset, 8)
    if #chunk < 8 then return nil end
    local id, n = sub(chunk, 1, 4), u32le(chunk, 5)
    if id == "ds64" then
      ds64_data = u64le(peek(offset + 8, 24), 9)
    elseif id == "fmt " then
      local fmt = peek(offset + 8, 26)
      if #fmt < 16 then return nil end
      frame_rate, byte_rate, checked = wav_rate(fmt)
    elseif id == "data" then
      local present = size - offset - 8
      local data = n
      if riff == "RF64" and n == 4294967295 and ds64_data then
        data = ds64_data
      elseif n == 0 or n == 4294967295 then -- a streaming writer: the bytes that follow
        data = present
      end
      if not frame_rate or frame_rate == 0 then return nil end
      local bytes = math.min(data, present)
      if byte_rate ~= frame_rate and byte_rate > 0 then return bytes / frame_rate, false, bytes / byte_rate, true end
      return bytes / frame_rate, false, nil, checked
    end
    offset = offset + 8 + n + n % 2
  end
  return nil
end

-- A claimed duration is a lie when the bytes sent could not hold that little audio: their
-- bit rate over it would pass the most the codec ever spends (`max_bps`, with 5% to spare).
local function implausible(bytes, seconds, max_bps)
  return seconds > 0 and bytes * 8 / seconds > max_bps * 1.05
end

local function id3v2_size(peek, offset)
  local h = peek(offset, 10)
  if #h < 10 or sub(h, 1, 3) ~= "ID3" then return 0 end
  local a, b, c, d = byte(h, 7, 10)
  local footer = (byte(h, 6) % 32 >= 16) and 10 or 0
  return 10 + ((a * 128 + b) * 128 + c) * 128 + d + footer
end

-- The file's last TAIL_MAX bytes, and the last of what take(tail, at) gives for each place
-- `pattern` (`plain`: a plain string) is found in them; nil where it gives nothing.
local function last_in_tail(peek, size, pattern, plain, take)
  local length = math.min(size, TAIL_MAX)
  local tail = peek(size - length, length)
  local last, pos = nil, 1
  while true do
    local at = find(tail, pattern, pos, plain)
    if not at then break end
    last = take(tail, at) or last
    pos = at + 1
  end
  return last, tail
end

-- CRC-8 (x^8 + x^2 + x + 1) of s's bytes i to j: what guards a FLAC frame header.
local function crc8(s, i, j)
  local crc = 0
  for k = i, j do
    crc = bit.bxor(crc, byte(s, k))
    for _ = 1, 8 do
      crc = bit.band(crc, 0x80) ~= 0 and bit.band(bit.bxor(bit.lshift(crc, 1), 0x07), 0xFF)
        or bit.band(bit.lshift(crc, 1), 0xFF)
    end
  end
  return crc
end

local FLAC_BLOCK = {[1] = 192, [2] = 576, [3] = 1152, [4] = 2304, [5] = 4608, [8] = 256, [9] = 512, [10] = 1024,
  [11] = 2048, [12] = 4096, [13] = 8192, [14] = 16384, [15] = 32768}

-- The samples up to the end of the FLAC frame whose header starts at 1-based i of s (its
-- number, coded as UTF-8 is, x the stream's block size, or its first sample's number, plus
-- its own block), or nil when no valid header (CRC-8 checked) starts there.
local function flac_frame_end(s, i, block_size)
  local b1, b2, b3, n = byte(s, i + 1, i + 4)
  if not n or b3 % 2 == 1 then return nil end -- the reserved bit
  local variable, code, rate_code = b1 == 0xF9, floor(b2 / 16), b2 % 16
  local extra = 0
  if n >= 0x80 then -- 110xxxxx: one more byte, 1110xxxx: two, ... 11111110: six
    local mask, more = 0x40, 0
    while mask > 0 and bit.band(n, mask) ~= 0 do more, mask = more + 1, mask / 2 end
    if more == 0 or more > 6 then return nil end
    n = bit.band(n, mask * 2 - 1)
    for k = 1, more do
      local c = byte(s, i + 4 + k)
      if not c or floor(c / 64) ~= 2 then return nil end
      n = n * 64 + c % 64
    end
    extra = more
  end
  local at = i + 5 + extra -- 1-based: the byte after the coded number
  local block = FLAC_BLOCK[code]
  if code == 6 then block, at = (byte(s, at) or 0) + 1, at + 1
  elseif code == 7 then
    local two = sub(s, at, at + 1)
    if #two < 2 then return nil end
    block, at = u16le(string.reverse(two), 1) + 1, at + 2
  end
  if rate_code == 12 then at = at + 1 elseif rate_code == 13 or rate_code == 14 then at = at + 2 end
  if not block or not byte(s, at) or crc8(s, i, at - 1) ~= byte(s, at) then return nil end
  return variable and n + block or n * block_size + block
end

-- The samples up to the last valid frame in the file's tail: what the data holds.
local function flac_tail_samples(peek, size, block_size)
  return (last_in_tail(peek, size, "\255[\248\249]", false, function(s, at)
    return flac_frame_end(s, at, block_size)
  end))
end

-- STREAMINFO's sample count is the container's claim. FLAC never takes much more room than the
-- raw PCM it codes (rate x channels x bits): a count too small for the bytes sent is a lie,
-- and the data's own figure stands: the last frame's header in the tail numbers its samples
-- (else the raw PCM rate bounds the audio from below: an estimate).
local function flac(peek, start, size)
  local info = peek(start + 8, 18) -- STREAMINFO follows "fLaC" and its 4-byte block header
  if #info < 18 then return nil end
  local b10, b11, b12, b13 = byte(info, 11, 14)
  local rate = b10 * 4096 + b11 * 16 + floor(b12 / 16)
  local channels, bits = floor(b12 / 2) % 8 + 1, (b12 % 2) * 16 + floor(b13 / 16) + 1
  local samples = (b13 % 16) * 4294967296 + u32be(info, 15)
  if rate == 0 or samples == 0 then return nil end
  local claimed, raw_bps = samples / rate, rate * channels * bits
  if not implausible(size - start, claimed, raw_bps) then return claimed end
  local played = flac_tail_samples(peek, size, u16le(string.reverse(sub(info, 3, 4)), 1))
  local least = (size - start) * 8 / (raw_bps * 1.05) -- a frame header can be forged too: never under this
  if played and played / rate >= least then return played / rate, false, claimed end
  return least, true, claimed
end

local MP3_BITRATES = {
  [1] = {32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320}, -- MPEG-1 Layer III
  [2] = {8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160}, -- MPEG-2/2.5 Layer III
}
local MP3_RATES = {[3] = {44100, 48000, 32000}, [2] = {22050, 24000, 16000}, [0] = {11025, 12000, 8000}}

-- A Layer III frame header at 1-based `i` of `h`: its fields, or nil.
local function mp3_frame(h, i)
  if #h < i + 3 then return nil end
  local b1, b2, b3, b4 = byte(h, i, i + 3)
  local version, layer = floor(b2 / 8) % 4, floor(b2 / 2) % 4
  if b1 ~= 255 or b2 < 224 or version == 1 or layer ~= 1 then return nil end
  local bitrate = MP3_BITRATES[version == 3 and 1 or 2][floor(b3 / 16)]
  local rate = MP3_RATES[version][floor(b3 / 4) % 4 + 1]
  if not bitrate or not rate then return nil end
  local mono = floor(b4 / 64) == 3
  return {rate = rate, bitrate = bitrate * 1000, samples = version == 3 and 1152 or 576,
    side = version == 3 and (mono and 17 or 32) or (mono and 9 or 17),
    max_bps = (version == 3 and 320 or 160) * 1000,
    length = floor((version == 3 and 144 or 72) * bitrate * 1000 / rate) + floor(b3 / 2) % 2}
end

-- The audio bytes x the seconds per byte of the frames read at MP3_PROBES places spread over
-- them: what a file whose frame count lied (or that has none, VBR) holds, as an estimate. At each
-- place, every frame whose header is in the window, from the first header the next one confirms
-- (not bytes that look like one): a VBR file's quiet frames are short and its loud ones long, so
-- one frame a place, or bit rates averaged, would weigh them wrongly. The frame cut by the
-- window's start is left out and the one cut by its end counted whole: a long frame is the likelier
-- at either, so the two even out (whole frames only would leave long ones out at both ends).
local MP3_PROBES = 16
local function mp3_by_frames(peek, size, start, audio)
  local bytes, seconds = 0, 0
  for k = 0, MP3_PROBES - 1 do
    local window = peek(start + floor(audio * k / MP3_PROBES), 4096)
    for i = 1, #window - 3 do
      local frame = mp3_frame(window, i)
      if frame and frame.length >= 4 and mp3_frame(window, i + frame.length) then
        local at = i
        while frame and frame.length >= 4 do
          bytes, seconds = bytes + frame.length, seconds + frame.samples / frame.rate
          at = at + frame.length
          frame = mp3_frame(window, at)
        end
        break
      end
    end
  end
  if bytes == 0 then return nil end
  return audio * seconds / bytes, true
end

-- `start`: where the audio begins (after any ID3v2 tag).
local function mp3(peek, size, start)
  local window = peek(start, 2052) -- some writers leave junk before the first frame: one slice
  local frame
  for skip = 0, #window - 4 do
    frame = mp3_frame(window, skip + 1)
    if frame then start = start + skip; break end
  end
  if not frame then return nil end
  local audio = size - start - (peek(size - 128, 3) == "TAG" and 128 or 0)
  local xing = start + 4 + frame.side
  local tag = peek(xing, 12)
  local id = sub(tag, 1, 4)
  if (id == "Xing" or id == "Info") and #tag == 12 then
    local flags = u32be(tag, 5)
    if flags % 2 == 1 then
      local frames = u32be(tag, 9)
      local lame = xing + 8 + 4 + (floor(flags / 2) % 2) * 4 + (floor(flags / 4) % 2) * 100 + (floor(flags / 8) % 2) * 4
      local skip = 0
      local l = peek(lame, 24)
      if #l == 24 and sub(l, 1, 4) == "LAME" then
        local a, b, c = byte(l, 22, 24)
        skip = (a * 16 + floor(b / 16)) + ((b % 16) * 256 + c) -- encoder delay + padding, in samples
      end
      local claimed = math.max(0, frames * frame.samples - skip) / frame.rate
      if not implausible(audio, claimed, frame.max_bps) then return claimed end
      local seconds = mp3_by_frames(peek, size, start, audio)
      return seconds, true, claimed
    end
  end
  local vbri = peek(start + 36, 18)
  if sub(vbri, 1, 4) == "VBRI" and #vbri == 18 then
    local claimed = u32be(vbri, 15) * frame.samples / frame.rate
    if not implausible(audio, claimed, frame.max_bps) then return claimed end
    local seconds = mp3_by_frames(peek, size, start, audio)
    return seconds, true, claimed
  end
  -- Constant bitrate: the audio bytes over the first frame's bitrate (a VBR file without a
  -- header would be wrong here, so it is an estimate).
  return audio * 8 / frame.bitrate, true
end

local function ogg(peek, head, size)
  local segments = byte(head, 27)
  if not segments then return nil end
  local packet = 28 + segments -- 1-based in head
  local serial = sub(head, 15, 18)
  local rate, preskip
  if sub(head, packet, packet + 7) == "OpusHead" then
    rate, preskip = 48000, u16le(head, packet + 10)
  elseif sub(head, packet, packet + 6) == "\1vorbis" then
    rate, preskip = u32le(head, packet + 12), 0
  else
    return nil
  end
  local window = TAIL_FIRST
  while true do
    local length = math.min(size, window)
    local tail = peek(size - length, length)
    local last, pos = nil, 1
    while true do
      local at = find(tail, "OggS", pos, true)
      if not at then break end
      if sub(tail, at + 14, at + 17) == serial and sub(tail, at + 6, at + 13) ~= "\255\255\255\255\255\255\255\255" then
        last = at
      end
      pos = at + 4
    end
    if last then
      if rate == 0 then return nil end
      local claimed = (u64le(tail, last + 6) - preskip) / rate
      -- Granules are the container's claim: Opus never spends over 510 kbit/s, Vorbis 500.
      if implausible(size, claimed, 512000) then return size * 8 / ESTIMATE_BPS.ogg, true, claimed end
      return claimed
    end
    if length >= size or window >= TAIL_MAX then return nil end
    window = TAIL_MAX
  end
end

-- The boxes from `offset` to `stop`: each (kind, offset of its body, offset past it), at most 64.
local function boxes(peek, offset, stop)
  local count = 0
  return function()
    if count >= 64 or offset + 8 > stop then return nil end
    count = count + 1
    local box = peek(offset, 16)
    if #box < 8 then return nil end
    local n, kind, header = u32be(box, 1), sub(box, 5, 8), 8
    if n == 1 and #box == 16 then n, header = u64be(box, 9), 16 elseif n == 0 then n = stop - offset end
    if n < header then return nil end
    local at = offset
    offset = offset + n
    return kind, at + header, math.min(at + n, stop)
  end
end

local function child(peek, start, stop, wanted)
  for kind, body, past in boxes(peek, start, stop) do
    if kind == wanted then return body, past end
  end
  return nil
end

-- The audio track's length from its sample table (`stts`: how many samples of what duration,
-- what a decoder plays), over its `mdhd` timescale; nil when there is no such track.
local function sample_table_seconds(peek, moov, moov_end)
  for kind, trak, trak_end in boxes(peek, moov, moov_end) do
    local mdia, mdia_end = nil, nil
    if kind == "trak" then mdia, mdia_end = child(peek, trak, trak_end, "mdia") end
    local hdlr = mdia and child(peek, mdia, mdia_end, "hdlr")
    if hdlr and sub(peek(hdlr + 8, 4), 1, 4) == "soun" then
      local mdhd = child(peek, mdia, mdia_end, "mdhd")
      local minf, minf_end = child(peek, mdia, mdia_end, "minf")
      local stbl, stbl_end = nil, nil
      if minf then stbl, stbl_end = child(peek, minf, minf_end, "stbl") end
      local stts = stbl and child(peek, stbl, stbl_end, "stts")
      if not (mdhd and stts) then return nil end
      local m = peek(mdhd, 32)
      local scale = byte(m, 1) == 1 and u32be(m, 21) or u32be(m, 13)
      local entries = math.min(u32be(peek(stts + 4, 4), 1), 4096)
      local table_bytes = peek(stts + 8, entries * 8)
      local samples = 0
      for e = 0, floor(#table_bytes / 8) - 1 do
        samples = samples + u32be(table_bytes, e * 8 + 1) * u32be(table_bytes, e * 8 + 5)
      end
      if scale == 0 then return nil end
      return samples / scale
    end
  end
  return nil
end

-- `mvhd`'s duration is the container's claim (rounded by muxers: the exact figure the tests
-- hold it to); the audio track's sample table is what plays. When they disagree by more than 2%
-- and 0.1 s, the claim is a lie and the table's figure stands.
local function mp4(peek, size)
  for kind, moov, moov_end in boxes(peek, 0, size) do
    if kind == "moov" then
      local mvhd = child(peek, moov, moov_end, "mvhd")
      if not mvhd then return nil end
      local header = peek(mvhd, 32)
      if #header < 32 then return nil end
      local scale, duration
      if byte(header, 1) == 1 then
        scale, duration = u32be(header, 21), u64be(header, 25)
      else
        scale, duration = u32be(header, 13), u32be(header, 17)
      end
      if scale == 0 or duration == 4294967295 then return nil end
      local claimed, played = duration / scale, sample_table_seconds(peek, moov, moov_end)
      if played and math.abs(played - claimed) > played * 0.02 + 0.1 then return played, false, claimed end
      -- The sample table is the client's to write too: a claim the bytes could not hold (AAC
      -- never spends 640 kbit/s) is not believed either, and the engine's figure decides.
      if implausible(size, claimed, 640000) then return size * 8 / ESTIMATE_BPS.mp4, true, claimed end
      return claimed
    end
  end
  return nil
end

-- An EBML variable-length integer at 1-based `i` of `s`: value, length (the marker bit
-- stripped when `strip`); an all-ones size is unknown (-1).
local function vint(s, i, strip)
  local first = byte(s, i)
  if not first or first == 0 then return nil, nil end
  local length, mask = 1, 128
  while first < mask do length, mask = length + 1, mask / 2 end
  local value = strip and (first - mask) or first
  local ones = value == mask - 1
  for k = 1, length - 1 do
    local b = byte(s, i + k)
    if not b then return nil, nil end
    value, ones = value * 256 + b, ones and b == 255
  end
  if strip and ones then return -1, length end
  return value, length
end

local function float_be(s, i, n)
  local b = {byte(s, i, i + n - 1)}
  if #b ~= n then return nil end
  local sign = b[1] >= 128 and -1 or 1
  if n == 4 then
    local exp = (b[1] % 128) * 2 + floor(b[2] / 128)
    local mant = ((b[2] % 128) * 256 + b[3]) * 256 + b[4]
    if exp == 255 then return nil end
    if exp == 0 then return sign * mant * 2 ^ -149 end
    return sign * (1 + mant / 8388608) * 2 ^ (exp - 127)
  end
  local exp = (b[1] % 128) * 16 + floor(b[2] / 16)
  local mant = b[2] % 16
  for k = 3, 8 do mant = mant * 256 + b[k] end
  if exp == 2047 then return nil end
  if exp == 0 then return sign * mant * 2 ^ -1074 end
  return sign * (1 + mant / 4503599627370496) * 2 ^ (exp - 1023)
end

local EBML_CONTAINERS = {[0x18538067] = true, [0x1549A966] = true} -- Segment, Info
local CLUSTER_ID = "\31\67\182\117"

-- An unsigned big-endian integer of n bytes; nil when n is not 1 to 8 (a lying size must not
-- make this loop for long: pcall does not stop a loop).
local function uint(s, i, n)
  if n < 1 or n > 8 then return nil end
  local value = 0
  for k = 0, n - 1 do value = value * 256 + (byte(s, i + k) or 0) end
  return value
end

-- Segment Info's Duration x TimecodeScale, from the head; nil (and the scale) without one.
local function webm_head(head)
  local i, scale, duration = 1, 1000000, nil
  while i <= #head do
    local id, idl = vint(head, i, false)
    if not id then break end
    local n, nl = vint(head, i + idl, true)
    if not n then break end
    local data = i + idl + nl
    if id == 0x1F43B675 then break end -- CLUSTER_ID -- the first Cluster: Info comes before it or not at all
    if EBML_CONTAINERS[id] then
      i = data -- descend
    else
      if n < 0 then break end
      if id == 0x2AD7B1 then
        scale = uint(head, data, n)
        if not scale then return nil, 1000000 end
      elseif id == 0x4489 and (n == 4 or n == 8) then
        duration = float_be(head, data, n)
      end
      i = data + n
    end
  end
  return duration and duration * scale / 1e9, scale
end

-- Without a Duration (browsers' MediaRecorder): the last Cluster's Timecode plus its last
-- block's, in the tail; short by that block's length (20 ms for Opus), so an estimate.
local function webm_tail(peek, size, scale)
  local last, tail = last_in_tail(peek, size, CLUSTER_ID, true, function(s, at)
    local _, nl = vint(s, at + 4, true)
    if nl and byte(s, at + 4 + nl) == 0xE7 then return at + 4 + nl end -- a Cluster starts with its Timecode
  end)
  if not last then return nil end
  local i, cluster, block = last, nil, 0
  while i <= #tail do
    local id, idl = vint(tail, i, false)
    if not id then break end
    local n, ml = vint(tail, i + idl, true)
    if not n or n < 0 then break end
    local data = i + idl + ml
    if id == 0xE7 then
      cluster = uint(tail, data, n)
    elseif id == 0xA3 or id == 0xA1 then -- SimpleBlock, Block: track number, then an int16 timecode
      local _, tl = vint(tail, data, true)
      local hi, lo = byte(tail, data + tl, data + tl + 1)
      if hi and lo then block = math.max(block, (hi * 256 + lo + 32768) % 65536 - 32768) end
    end
    i = (id == 0xA0) and data or data + n -- a BlockGroup holds its Block
  end
  return cluster and (cluster + block) * scale / 1e9, true
end

-- Duration is the container's claim; the last Cluster's timecode is where the data ends. A
-- Duration short of it (by more than 2% and a block) is a lie: the data's figure stands.
local function webm(peek, head, size)
  local seconds, scale = webm_head(head)
  local data = webm_tail(peek, size, scale)
  if seconds and (not data or data <= seconds * 1.02 + 0.1) then
    if implausible(size, seconds, 512000) then return size * 8 / ESTIMATE_BPS.webm, true, seconds end
    return seconds
  end
  if seconds then return data, true, seconds end
  return data, true
end

-- The format by its first bytes; nil when unknown.
local function format_of(head)
  local four = sub(head, 1, 4)
  if (four == "RIFF" or four == "RF64") and sub(head, 9, 12) == "WAVE" then return "wav" end
  if four == "fLaC" then return "flac" end
  if four == "OggS" then return "ogg" end
  if four == "\26\69\223\163" then return "webm" end
  if sub(head, 5, 8) == "ftyp" then return "mp4" end
  if sub(head, 1, 3) == "ID3" or (byte(head, 1) == 255 and (byte(head, 2) or 0) >= 224) then return "mp3" end
  return nil
end

local function measure(kind, peek, head, size)
  if kind == "wav" then return wav(peek, head, size) end
  if kind == "flac" then return flac(peek, 0, size) end
  if kind == "ogg" then return ogg(peek, head, size) end
  if kind == "mp4" then return mp4(peek, size) end
  if kind == "webm" then return webm(peek, head, size) end
  if kind == "mp3" then
    local id3 = id3v2_size(peek, 0)
    if peek(id3, 4) == "fLaC" then return flac(peek, id3, size) end -- FLAC behind an ID3 tag
    return mp3(peek, size, id3)
  end
  return nil
end

local function extension_of(filename)
  local ext = filename and filename:match("%.([%w]+)$")
  return ext and ext:lower() or ""
end

-- A header's duration under this is not trusted either: no upload is that short, and LuaJIT's
-- string.format("%.3f") shows numbers under about 1e-171 (a WebM Duration can be one) as huge
-- ones (LuaJIT 2.1 since 7152e154, 2025-12-08).
local MIN_SECONDS = 0.001

-- Seconds of audio in a file part of `size` bytes, read through read(offset, n), whether that
-- is an estimate, what the container claimed when that was a lie (else nil), and whether the
-- figure was checked against data no client can set apart from the samples (a sample-format
-- WAV's bytes: then the engine's own figure need not be read). Never more than max_seconds; never an error.
local function audio_duration(read, size, filename, max_seconds)
  local kind, seconds, estimated, claimed, checked = nil, nil, false, nil, false
  local ok = pcall(function()
    local peek, head = view(read, size)
    kind = format_of(head)
    if kind then seconds, estimated, claimed, checked = measure(kind, peek, head, size) end
  end)
  if not ok or not seconds or seconds ~= seconds or seconds < MIN_SECONDS or seconds > max_seconds then
    kind = kind or EXTENSIONS[extension_of(filename)]
    seconds, estimated, checked = math.min(max_seconds, size * 8 / ESTIMATE_BPS[kind or "other"]), true, false
  end
  if type(claimed) ~= "number" or claimed ~= claimed then claimed = nil end
  return seconds, estimated == true, claimed, checked == true
end

return {audio_duration = audio_duration}
