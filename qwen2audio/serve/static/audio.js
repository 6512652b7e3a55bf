// Audio for the page: clips (a recording or a file), the microphone recorded into a 16 kHz mono WAV file that
// the server's built-in WAV reader takes without any decoder, and the base64 text a request carries.

export const MODEL_RATE = 16000; // Qwen2-Audio hears 16 kHz mono: recordings are stored at that rate
const FORMATS = ["wav", "mp3", "flac", "ogg", "opus", "m4a", "aac", "webm"]; // what the API's "format" may say

// A clip in the conversation: its bytes, the format the request names, a name for people, a URL for <audio>.
export function makeClip(blob, name, format) {
  return { blob, name, format, url: URL.createObjectURL(blob), base64: null };
}

// A file's format, from its name or its type; "wav" when neither says (the server reads the bytes anyway).
export function formatOf(file) {
  const extension = file.name.includes(".") ? file.name.split(".").pop().toLowerCase() : "";
  if (FORMATS.includes(extension)) return extension;
  const subtype = (file.type.split("/")[1] || "").replace(/^x-/, "");
  const known = { mpeg: "mp3", wave: "wav", mp4: "m4a" }[subtype] || subtype;
  return FORMATS.includes(known) ? known : "wav";
}

// The clip's bytes in base64 (computed once: the whole conversation is sent again with every turn).
export async function base64Of(clip) {
  if (clip.base64 === null) {
    const dataURL = await new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(clip.blob);
    });
    clip.base64 = dataURL.slice(dataURL.indexOf(",") + 1); // "data:audio/wav;base64,AAAA" -> "AAAA"
  }
  return clip.base64;
}

// A WAV file of 16-bit PCM mono samples: the 44-byte RIFF header, then the samples, little-endian.
export function encodeWav(samples, rate) {
  const dataBytes = 2 * samples.length;
  const view = new DataView(new ArrayBuffer(44 + dataBytes));
  const ascii = (offset, text) => [...text].forEach((c, i) => view.setUint8(offset + i, c.charCodeAt(0)));
  ascii(0, "RIFF");
  view.setUint32(4, 36 + dataBytes, true); // the size of everything after this field
  ascii(8, "WAVE");
  ascii(12, "fmt ");
  view.setUint32(16, 16, true); // the fmt chunk's size
  view.setUint16(20, 1, true); // format 1: integer PCM
  view.setUint16(22, 1, true); // one channel
  view.setUint32(24, rate, true); // frames per second
  view.setUint32(28, rate * 2, true); // bytes per second
  view.setUint16(32, 2, true); // bytes per frame
  view.setUint16(34, 16, true); // bits per sample
  ascii(36, "data");
  view.setUint32(40, dataBytes, true);
  samples.forEach((x, i) => view.setInt16(44 + 2 * i, Math.round(Math.max(-1, Math.min(1, x)) * 32767), true));
  return new Blob([view], { type: "audio/wav" });
}

// Any audio the browser can decode -> mono float samples at 16 kHz. Decoding through a context running at 16 kHz
// makes the browser resample; the channels are then averaged, as the server does with a stereo file.
async function decodeMono(blob, rate) {
  const context = new OfflineAudioContext(1, 1, rate);
  const audio = await context.decodeAudioData(await blob.arrayBuffer());
  const mono = new Float32Array(audio.length);
  for (let c = 0; c < audio.numberOfChannels; c++) {
    const channel = audio.getChannelData(c);
    for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / audio.numberOfChannels;
  }
  return mono;
}

// Why the microphone cannot be used, in plain words.
function microphoneProblem(error) {
  if (!window.isSecureContext) {
    return "The browser allows the microphone only on a secure page: open this page as http://localhost:PORT or " +
      "http://127.0.0.1:PORT on the server's machine, or serve it over https.";
  }
  if (error.name === "NotAllowedError") return "The microphone was refused: allow it in the browser's site settings.";
  if (error.name === "NotFoundError") return "No microphone was found.";
  return `The microphone cannot be used: ${error.message}`;
}

// The microphone. start() asks for it and records; while recording, onLevel(level 0..1, seconds) is called on
// every animation frame (for the level meter and the timer); stop() ends it and gives the recording as a WAV Blob.
export class Recorder {
  constructor(onLevel) {
    this.onLevel = onLevel;
  }

  async start() {
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (error) {
      throw new Error(microphoneProblem(error));
    }
    this.chunks = [];
    this.recorder = new MediaRecorder(this.stream); // the browser's own compressed format (WebM/Opus in Chromium)
    this.recorder.ondataavailable = (event) => this.chunks.push(event.data);
    this.recorder.start();
    this.watchLevel();
  }

  // The level: the root mean square of the latest samples, read from an analyser on the same stream.
  watchLevel() {
    this.meter = new AudioContext();
    const analyser = this.meter.createAnalyser();
    this.meter.createMediaStreamSource(this.stream).connect(analyser);
    const samples = new Float32Array(analyser.fftSize);
    const started = performance.now();
    const tick = () => {
      analyser.getFloatTimeDomainData(samples);
      const rms = Math.sqrt(samples.reduce((sum, x) => sum + x * x, 0) / samples.length);
      this.onLevel(Math.min(1, 3 * rms), (performance.now() - started) / 1000);
      this.frame = requestAnimationFrame(tick);
    };
    tick();
  }

  async stop() {
    const stopped = new Promise((resolve) => this.recorder.addEventListener("stop", resolve, { once: true }));
    this.recorder.stop();
    await stopped;
    cancelAnimationFrame(this.frame);
    this.stream.getTracks().forEach((track) => track.stop()); // the browser's "recording" indicator goes off
    await this.meter.close();
    const recorded = new Blob(this.chunks, { type: this.recorder.mimeType });
    let samples;
    try {
      samples = await decodeMono(recorded, MODEL_RATE);
    } catch {
      throw new Error("The recording could not be read back (was it too short?); record again.");
    }
    return encodeWav(samples, MODEL_RATE);
  }
}
