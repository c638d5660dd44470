// The editing surface: the picture (which the paint brush draws on) under a mask layer (which
// the mask brush marks: opaque = repaint), undo snapshots of both, and the edge handles that
// extend the canvas for outpainting. Coordinates are the picture's own pixels; the canvases are
// shown scaled up, so pointer positions are divided by the display scale.

const UNDO_DEPTH = 40;
const DISPLAY_SIDE = 512; // the picture is shown about this large
const MASK_COLOUR = "rgb(255, 40, 40)";

export class EditorCanvas {
  constructor(frame, onChange) {
    this.frame = frame;
    this.image = frame.querySelector("#image-canvas");
    this.mask = frame.querySelector("#mask-canvas");
    this.extension = frame.querySelector("#extension");
    this.onChange = onChange;
    this.undoStack = [];
    this.tool = "mask";
    this.size = 12;
    this.colour = "#ff0000";
    this.margins = { left: 0, right: 0, top: 0, bottom: 0 };
    this.scale = 1;
    this.hasPicture = false;
    this.fitDisplay();
    this.bindBrush();
    this.bindHandles();
  }

  // ---- the picture ----

  setPicture(bitmap) {
    this.snapshot();
    for (const canvas of [this.image, this.mask]) {
      canvas.width = bitmap.width;
      canvas.height = bitmap.height;
    }
    this.image.getContext("2d").drawImage(bitmap, 0, 0);
    this.hasPicture = true;
    this.resetMargins();
    this.fitDisplay();
    this.changed();
  }

  fitDisplay() {
    const { width, height } = this.image;
    this.scale = Math.max(1, Math.floor(DISPLAY_SIDE / Math.max(width, height)));
    this.image.style.width = `${width * this.scale}px`;
    this.image.style.height = `${height * this.scale}px`;
    this.showExtension();
  }

  pictureDataURL() {
    return this.image.toDataURL("image/png");
  }

  // The mask as a PNG whose alpha marks what to repaint (the server reads an RGBA mask by alpha).
  maskDataURL() {
    return this.mask.toDataURL("image/png");
  }

  hasMask() {
    const pixels = this.mask.getContext("2d").getImageData(0, 0, this.mask.width, this.mask.height).data;
    for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) return true;
    return false;
  }

  invertMask() {
    this.snapshot();
    const context = this.mask.getContext("2d");
    const data = context.getImageData(0, 0, this.mask.width, this.mask.height);
    const pixels = data.data;
    for (let i = 0; i < pixels.length; i += 4) {
      pixels[i] = 255; pixels[i + 1] = 40; pixels[i + 2] = 40;
      pixels[i + 3] = 255 - pixels[i + 3];
    }
    context.putImageData(data, 0, 0);
    this.changed();
  }

  clearMask() {
    this.snapshot();
    this.mask.getContext("2d").clearRect(0, 0, this.mask.width, this.mask.height);
    this.changed();
  }

  // ---- undo: whole-canvas snapshots (pictures here are small; simplicity wins) ----

  snapshot() {
    const grab = (canvas) => canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
    this.undoStack.push({ image: grab(this.image), mask: grab(this.mask), hasPicture: this.hasPicture,
                          margins: { ...this.margins } });
    if (this.undoStack.length > UNDO_DEPTH) this.undoStack.shift();
  }

  undo() {
    const state = this.undoStack.pop();
    if (!state) return;
    for (const [canvas, data] of [[this.image, state.image], [this.mask, state.mask]]) {
      canvas.width = data.width;
      canvas.height = data.height;
      canvas.getContext("2d").putImageData(data, 0, 0);
    }
    this.hasPicture = state.hasPicture;
    this.margins = state.margins;
    this.fitDisplay();
    this.changed();
  }

  changed() {
    this.onChange?.();
  }

  // ---- brushes ----

  bindBrush() {
    let last = null;
    const at = (event) => {
      const box = this.mask.getBoundingClientRect();
      return [(event.clientX - box.left) * this.mask.width / box.width,
              (event.clientY - box.top) * this.mask.height / box.height];
    };
    this.mask.addEventListener("pointerdown", (event) => {
      this.snapshot();
      this.mask.setPointerCapture(event.pointerId);
      last = at(event);
      this.stroke(last, last);
    });
    this.mask.addEventListener("pointermove", (event) => {
      if (!last) return;
      const point = at(event);
      this.stroke(last, point);
      last = point;
    });
    const end = () => {
      if (last) this.changed();
      last = null;
    };
    this.mask.addEventListener("pointerup", end);
    this.mask.addEventListener("pointercancel", end);
  }

  stroke(from, to) {
    const painting = this.tool === "paint";
    const context = (painting ? this.image : this.mask).getContext("2d");
    context.save();
    context.globalCompositeOperation = this.tool === "erase" ? "destination-out" : "source-over";
    context.strokeStyle = painting ? this.colour : MASK_COLOUR;
    context.lineWidth = this.size;
    context.lineCap = context.lineJoin = "round";
    context.beginPath();
    context.moveTo(...from);
    context.lineTo(...to);
    context.stroke();
    context.restore();
  }

  // ---- outpainting: drag an edge outward; the margins go with the next edit ----

  bindHandles() {
    for (const handle of this.frame.querySelectorAll(".handle")) {
      handle.addEventListener("pointerdown", (event) => {
        event.preventDefault();
        handle.setPointerCapture(event.pointerId);
        const side = handle.dataset.side;
        const start = { x: event.clientX, y: event.clientY, value: this.margins[side] };
        let snapshotTaken = false;
        const move = (e) => {
          const along = side === "left" ? start.x - e.clientX : side === "right" ? e.clientX - start.x
            : side === "top" ? start.y - e.clientY : e.clientY - start.y;
          const pixels = Math.max(0, Math.round((start.value + along / this.scale) / 8) * 8);
          if (pixels === this.margins[side]) return;
          if (!snapshotTaken) { this.snapshot(); snapshotTaken = true; }
          this.margins[side] = pixels;
          this.showExtension();
          this.changed();
        };
        const up = () => {
          handle.removeEventListener("pointermove", move);
          handle.removeEventListener("pointerup", up);
        };
        handle.addEventListener("pointermove", move);
        handle.addEventListener("pointerup", up);
      });
    }
  }

  extended() {
    return Object.values(this.margins).some((v) => v > 0);
  }

  resetMargins() {
    this.margins = { left: 0, right: 0, top: 0, bottom: 0 };
    this.showExtension();
  }

  showExtension() {
    const m = this.margins;
    const s = this.scale;
    Object.assign(this.extension.style, {
      display: this.extended() ? "block" : "none",
      left: `${-m.left * s}px`, top: `${-m.top * s}px`,
      width: `${(this.image.width + m.left + m.right) * s}px`,
      height: `${(this.image.height + m.top + m.bottom) * s}px`,
    });
  }
}
