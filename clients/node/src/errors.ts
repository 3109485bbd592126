/** An error the shim reported: its stable code, whether the command may have run, and what to try next. */
export class ShimError extends Error {
  readonly code: string;
  readonly ran: boolean;
  readonly hint: string | undefined;
  readonly agentCode: string | undefined;

  constructor(code: string, message: string, options: { ran?: boolean; hint?: string; agentCode?: string } = {}) {
    super(options.hint ? `${message} (next: ${options.hint})` : message);
    this.name = 'ShimError';
    this.code = code;
    this.ran = options.ran ?? false;
    this.hint = options.hint;
    this.agentCode = options.agentCode;
  }

  static from(error: unknown): ShimError {
    const e = (error ?? {}) as { code?: unknown; message?: unknown; ran?: unknown; hint?: unknown; agentCode?: unknown };
    return new ShimError(String(e.code ?? 'INTERNAL'), String(e.message ?? 'the shim failed'), {
      ran: e.ran === true,
      ...(typeof e.hint === 'string' ? { hint: e.hint } : {}),
      ...(typeof e.agentCode === 'string' ? { agentCode: e.agentCode } : {}),
    });
  }
}

/** No shim could be found; `tried` says where it was looked for, in order. */
export class ShimNotFound extends Error {
  readonly tried: string[];

  constructor(tried: string[]) {
    super(`terminai-shim was not found; tried: ${tried.join('; ')}`);
    this.name = 'ShimNotFound';
    this.tried = tried;
  }
}
