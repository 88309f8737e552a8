package h2srv

import (
	"encoding/binary"

	"golang.org/x/net/http2"
)

// The writer appends frames to one buffer and writes it with one call;
// x/net's Framer would copy each frame through a buffer of its own, so the
// few frame types a server sends are encoded here (RFC 9113 §4.1, §6).

const (
	frameHeaderLen = 9
	// maxWindow is the largest flow-control window (RFC 9113 §6.9.1).
	maxWindow = 1<<31 - 1
	// initialWindow is every window's size before SETTINGS say otherwise.
	initialWindow = 65535
	// defaultMaxFrame is the peer's SETTINGS_MAX_FRAME_SIZE until it says
	// otherwise.
	defaultMaxFrame = 16384
	// maxReadFrame is the SETTINGS_MAX_FRAME_SIZE we advertise: room for
	// one whole TLS record of payload (16384 plaintext bytes plus up to 29
	// of record overhead, TLS 1.2 or 1.3). A client relaying a tunnel's
	// TLS records as they come (x/net's sends one DATA frame per body
	// Read, at most this size) then sends one frame per record instead of
	// a 16384-byte frame and a 22-byte one, which also cost it, and us, a
	// TLS record each.
	maxReadFrame = defaultMaxFrame + 1024
	// dataChunk is the largest DATA payload whose frame fits one 16 KiB
	// TLS record, so a client decrypts whole frames per record.
	dataChunk = 16384 - frameHeaderLen
)

func appendFrameHeader(b []byte, length int, t http2.FrameType, flags http2.Flags, stream uint32) []byte {
	return append(b, byte(length>>16), byte(length>>8), byte(length), byte(t), byte(flags),
		byte(stream>>24)&0x7f, byte(stream>>16), byte(stream>>8), byte(stream))
}

func appendSettings(b []byte, ss ...http2.Setting) []byte {
	b = appendFrameHeader(b, 6*len(ss), http2.FrameSettings, 0, 0)
	for _, s := range ss {
		b = binary.BigEndian.AppendUint16(b, uint16(s.ID))
		b = binary.BigEndian.AppendUint32(b, s.Val)
	}
	return b
}

func appendSettingsAck(b []byte) []byte {
	return appendFrameHeader(b, 0, http2.FrameSettings, http2.FlagSettingsAck, 0)
}

func appendPing(b []byte, ack bool, data [8]byte) []byte {
	var f http2.Flags
	if ack {
		f = http2.FlagPingAck
	}
	return append(appendFrameHeader(b, 8, http2.FramePing, f, 0), data[:]...)
}

func appendWindowUpdate(b []byte, stream, incr uint32) []byte {
	return binary.BigEndian.AppendUint32(appendFrameHeader(b, 4, http2.FrameWindowUpdate, 0, stream), incr&0x7fffffff)
}

func appendRSTStream(b []byte, stream uint32, code http2.ErrCode) []byte {
	return binary.BigEndian.AppendUint32(appendFrameHeader(b, 4, http2.FrameRSTStream, 0, stream), uint32(code))
}

func appendGoAway(b []byte, last uint32, code http2.ErrCode, debug string) []byte {
	b = appendFrameHeader(b, 8+len(debug), http2.FrameGoAway, 0, 0)
	b = binary.BigEndian.AppendUint32(b, last&0x7fffffff)
	b = binary.BigEndian.AppendUint32(b, uint32(code))
	return append(b, debug...)
}

func appendData(b []byte, stream uint32, end bool, p []byte) []byte {
	var f http2.Flags
	if end {
		f = http2.FlagDataEndStream
	}
	return append(appendFrameHeader(b, len(p), http2.FrameData, f, stream), p...)
}

// appendHeaderBlock writes an encoded header block as HEADERS and as many
// CONTINUATION frames as the peer's frame size asks for.
func appendHeaderBlock(b []byte, stream uint32, end bool, block []byte, maxFrame int) []byte {
	first := true
	for {
		frag := block[:min(len(block), maxFrame)]
		block = block[len(frag):]
		var f http2.Flags
		if len(block) == 0 {
			f |= http2.FlagHeadersEndHeaders
		}
		t := http2.FrameContinuation
		if first {
			t = http2.FrameHeaders
			if end {
				f |= http2.FlagHeadersEndStream
			}
		}
		b = append(appendFrameHeader(b, len(frag), t, f, stream), frag...)
		first = false
		if len(block) == 0 {
			return b
		}
	}
}
