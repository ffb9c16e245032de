package ferry

import java.util.concurrent.{LinkedBlockingQueue, TimeUnit}

import scala.jdk.CollectionConverters._

import com.google.protobuf.{ByteString, InvalidProtocolBufferException, UnsafeByteOperations}
import ferry.proto.v1._
import io.grpc._
import io.grpc.health.v1.{HealthCheckRequest, HealthCheckResponse, HealthGrpc}
import io.grpc.netty.shaded.io.grpc.netty.NettyChannelBuilder
import io.grpc.protobuf.ProtoUtils
import io.grpc.stub.{ClientCallStreamObserver, ClientCalls, ClientResponseObserver}
import org.apache.spark.TaskContext
import org.apache.spark.sql.types.StructType

/**
 * A client of one ferry worker (`ferry.v1.Worker` over gRPC): a channel with the bearer token on
 * every call, blocking calls for `ListStages` / `Describe` / health, and a streaming [[run]] with
 * bounded in-flight batches whose output comes back in input order.
 *
 * gRPC failures become typed [[FerryException]]s (see [[WorkerClient.mapError]]).
 */
final class WorkerClient private (
    val target: String,
    token: String,
    val maxMessageBytes: Int,
    val rpcTimeoutMs: Long,
    val responseTimeoutMs: Long,
    private val channel: ManagedChannel,
    sharedMemoryBytes: Long = 0L) extends AutoCloseable {

  import WorkerClient._

  private val auth = new BearerTokenInterceptor(token)

  private def blocking: WorkerGrpc.WorkerBlockingStub =
    WorkerGrpc.newBlockingStub(channel)
      .withInterceptors(auth)
      .withMaxInboundMessageSize(maxMessageBytes)
      .withMaxOutboundMessageSize(maxMessageBytes)
      .withDeadlineAfter(rpcTimeoutMs, TimeUnit.MILLISECONDS)

  private def async: WorkerGrpc.WorkerStub =
    WorkerGrpc.newStub(channel)
      .withInterceptors(auth)
      .withMaxInboundMessageSize(maxMessageBytes)
      .withMaxOutboundMessageSize(maxMessageBytes)

  /** Every stage the worker serves, with its param specs. */
  def listStages(): Seq[StageSpec] =
    call("ListStages", "")(blocking.listStages(ListStagesRequest.getDefaultInstance).getStagesList.asScala.toSeq)

  /**
   * One stage's spec; with `paramsJson` and an `inputSchema`, validates both on the worker and
   * returns the output schema and the normalized params (defaults applied).
   */
  def describe(stage: String, paramsJson: String = "", inputSchema: Option[StructType] = None): Described = {
    val req = DescribeRequest.newBuilder().setStage(stage).setParamsJson(paramsJson)
    inputSchema.foreach(s => req.setInputSchema(ArrowBatches.serializeSchema(ArrowBatches.toArrowSchema(s, stage))))
    val resp = withStageNames(call("Describe", stage)(blocking.describe(req.build())))
    Described(
      resp.getSpec,
      if (resp.getOutputSchema.isEmpty) None
      else Some(ArrowBatches.fromArrowSchema(ArrowBatches.deserializeSchema(resp.getOutputSchema), stage)),
      resp.getParamsJson)
  }

  /** Standard `grpc.health.v1` check (no token needed); throws [[WorkerUnavailableException]] unless SERVING. */
  def checkHealth(timeoutMs: Long = rpcTimeoutMs): Unit = {
    val status =
      try {
        HealthGrpc.newBlockingStub(channel).withDeadlineAfter(timeoutMs, TimeUnit.MILLISECONDS)
          .check(HealthCheckRequest.newBuilder().setService("ferry.v1.Worker").build()).getStatus
      } catch {
        case e: StatusRuntimeException => throw mapError(e, target, "Health/Check", "")
      }
    if (status != HealthCheckResponse.ServingStatus.SERVING) {
      throw new WorkerUnavailableException(s"The worker at $target answers its health check with $status, " +
        "expected SERVING; it may be shutting down. A new worker will be started on the next call.")
    }
  }

  /**
   * Opens a `Run` of `stage` and streams `inputs` (Arrow record-batch messages of
   * `inputSchema`) through it. At most `maxInFlight` batches are sent ahead of the answers, and
   * `inputs` is pulled only as the returned stream is consumed, on the consuming thread.
   * The returned stream yields the output batch messages in input order.
   */
  def run(stage: String, paramsJson: String, inputSchema: ByteString, inputs: Iterator[ByteString],
      maxInFlight: Int, resources: Seq[String] = Nil): RunStream = {
    val files = acquireShared()
    val stream = new RunStream(this, stage, inputs, maxInFlight, files)
    val open = Open.newBuilder().setStage(stage).setParamsJson(paramsJson).setInputSchema(inputSchema)
      .addAllResources(resources.asJava)
    files.foreach(f => open.setSharedMemory(f.offer))
    stream.open(async, open.build())
    stream
  }

  // Shared memory with a worker on this host (see SharedFiles): made on the first run, given up
  // for good if the worker cannot open it.
  private var shared: Option[SharedFiles] = None
  private var sharedRefused = sharedMemoryBytes <= 0

  /** The shared files for one Run stream, if this client has them and no other stream holds them. */
  private def acquireShared(): Option[SharedFiles] = synchronized {
    if (sharedRefused) return None
    if (shared.isEmpty) {
      shared = SharedFiles.defaultDir.flatMap(SharedFiles.create(_, sharedMemoryBytes))
      if (shared.isEmpty) { sharedRefused = true; return None }
    }
    shared.filter(_.tryAcquire())
  }

  /** Whether the worker took the shared files a stream offered: either way their names can go. */
  private[ferry] def sharedAnswered(files: SharedFiles, accepted: Boolean): Unit = synchronized {
    try files.unlink() catch { case scala.util.control.NonFatal(_) => }
    if (!accepted && shared.contains(files)) {
      sharedRefused = true
      shared = None
      files.close()
    }
  }

  /** Whether a worker uses shared memory with this client (for tests and logs). */
  def usesSharedMemory: Boolean = synchronized(shared.isDefined && !sharedRefused)

  /** Digests of the resources this client uploaded (a worker keeps them for its lifetime). */
  private val uploaded = java.util.concurrent.ConcurrentHashMap.newKeySet[String]()

  /**
   * Uploads `data` with `PutResource` unless this client already did, and returns its sha256 hex
   * digest, the name a stage's Open refers to it by: a model is sent once per worker, not per task.
   */
  def ensureResource(data: Array[Byte]): String = {
    val digest = sha256Hex(data)
    if (!uploaded.contains(digest)) {
      putResource(digest, data)
      uploaded.add(digest)
    }
    digest
  }

  /** Forgets which resources were uploaded (after a worker answered that it lacks one). */
  def forgetResources(): Unit = uploaded.clear()

  private def putResource(digest: String, data: Array[Byte]): Unit = {
    val answer = new java.util.concurrent.CompletableFuture[ResourceRef]()
    val requests = async.withDeadlineAfter(rpcTimeoutMs, TimeUnit.MILLISECONDS).putResource(
      new io.grpc.stub.StreamObserver[ResourceRef] {
        override def onNext(value: ResourceRef): Unit = answer.complete(value)
        override def onError(t: Throwable): Unit = answer.completeExceptionally(t)
        override def onCompleted(): Unit = ()
      })
    // Chunks well under the message limit; the digest travels on the first so the worker can verify.
    val chunk = math.max(1, math.min(1 << 20, maxMessageBytes / 2))
    var off = 0
    do {
      val n = math.min(chunk, data.length - off)
      val msg = ResourceChunk.newBuilder().setData(ByteString.copyFrom(data, off, n))
      if (off == 0) msg.setSha256(digest)
      requests.onNext(msg.build())
      off += n
    } while (off < data.length)
    requests.onCompleted()
    val ref =
      try answer.get(rpcTimeoutMs + 1000, TimeUnit.MILLISECONDS)
      catch {
        case e: java.util.concurrent.ExecutionException => throw mapError(e.getCause, target, "PutResource", "")
        case _: java.util.concurrent.TimeoutException =>
          throw new WorkerUnavailableException(s"The worker at $target did not acknowledge a ${data.length}-byte " +
            s"resource within ${rpcTimeoutMs} ms (${FerryConf.RpcTimeout}).", null)
      }
    if (ref.getSha256 != digest || ref.getSize != data.length) {
      throw new ProtocolException(s"The worker at $target stored resource ${ref.getSha256} (${ref.getSize} bytes) " +
        s"for $digest (${data.length} bytes).", null)
    }
  }

  private def call[T](method: String, stage: String)(body: => T): T =
    try body
    catch { case e: StatusRuntimeException => throw mapError(e, target, method, stage) }

  private def withStageNames[T](body: => T): T =
    try body
    catch {
      case e: UnknownStageException =>
        val known = try listStages().map(_.getName).sorted.mkString(", ") catch { case _: Exception => "?" }
        throw new UnknownStageException(e.stage, s"${e.getMessage} The worker at $target serves: $known.", e.getCause)
    }

  /** Whether the channel was shut down. */
  def isShutdown: Boolean = channel.isShutdown

  override def close(): Unit = {
    synchronized { shared.foreach(_.close()); shared = None; sharedRefused = true }
    channel.shutdown()
    if (!channel.awaitTermination(2, TimeUnit.SECONDS)) channel.shutdownNow()
  }

  override def toString: String = s"WorkerClient($target)"
}

object WorkerClient {

  /**
   * Parses a RunResponse from one array holding the whole message, its batch bytes aliasing that
   * array. gRPC's default protobuf marshaller copies a message's bytes twice on the way in (into
   * a parse buffer, then into the ByteString; over 4 MB through a stream decoder, again twice),
   * and a batch of image tiles is tens of megabytes: one copy is enough.
   */
  private[ferry] object RunResponseMarshaller extends MethodDescriptor.Marshaller[RunResponse] {
    private val default = ProtoUtils.marshaller(RunResponse.getDefaultInstance)

    override def stream(value: RunResponse): java.io.InputStream = default.stream(value)

    override def parse(stream: java.io.InputStream): RunResponse = {
      val bytes = try stream match {
        case known: KnownLength =>
          val data = new Array[Byte](known.available())
          val read = stream.readNBytes(data, 0, data.length)
          if (read == data.length && stream.read() == -1) data
          else throw Status.INTERNAL.withDescription(s"A Run response stated ${data.length} bytes but " +
            (if (read < data.length) s"ended after $read" else "ran past them") +
            ": the transport cut or mixed up the message; the task fails and Spark retries it.").asRuntimeException()
        case _ => stream.readAllBytes()
      } finally stream.close()
      parse(bytes)
    }

    /** Parses `bytes`, which must not change afterwards: the batch bytes are a view of them. */
    def parse(bytes: Array[Byte]): RunResponse = {
      // A coded input over an array it may treat as immutable: only then does aliasing apply
      // (CodedInputStream.newInstance(byte[]) copies every bytes field regardless).
      val in = UnsafeByteOperations.unsafeWrap(bytes).newCodedInput()
      in.enableAliasing(true)
      in.setSizeLimit(Int.MaxValue) // gRPC's inbound limit has bounded the message already
      try RunResponse.parseFrom(in)
      catch {
        case e: InvalidProtocolBufferException =>
          throw Status.INTERNAL.withDescription("Invalid protobuf byte sequence in a Run response").withCause(e)
            .asRuntimeException()
      }
    }
  }

  private[ferry] val RunMethod: MethodDescriptor[RunRequest, RunResponse] =
    WorkerGrpc.getRunMethod.toBuilder(ProtoUtils.marshaller(RunRequest.getDefaultInstance), RunResponseMarshaller)
      .build()

  /** Lower-case hex sha256 of `data`: how resources are named on the wire. */
  def sha256Hex(data: Array[Byte]): String =
    java.security.MessageDigest.getInstance("SHA-256").digest(data).map(b => f"${b & 0xff}%02x").mkString

  /** What `Describe` answered. */
  final case class Described(spec: StageSpec, outputSchema: Option[StructType], paramsJson: String)

  val AuthorizationKey: Metadata.Key[String] = Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER)
  val StageErrorKey: Metadata.Key[StageError] =
    Metadata.Key.of("ferry-stage-error-bin", ProtoUtils.metadataMarshaller(StageError.getDefaultInstance))

  /** Tracebacks travel in trailers: allow far more than gRPC's 8 KiB default. */
  private val MaxMetadataBytes = 4 << 20

  /** A client of the worker at `host:port` carrying `token`. */
  def connect(host: String, port: Int, token: String, conf: FerryConf): WorkerClient =
    connect(s"$host:$port", token, conf)

  /**
   * A client of a worker this JVM started on its own host: Run batches go through shared memory
   * (`spark.ferry.sharedMemory.bytes` per direction) when the worker can open it.
   */
  def connectLocal(port: Int, token: String, conf: FerryConf): WorkerClient =
    connect(s"127.0.0.1:$port", token, conf, conf.sharedMemoryBytes)

  def connect(target: String, token: String, conf: FerryConf, sharedMemoryBytes: Long = 0L): WorkerClient = {
    val channel = NettyChannelBuilder.forTarget(target)
      .usePlaintext()
      .maxInboundMessageSize(conf.grpcMaxMessageBytes)
      .maxInboundMetadataSize(MaxMetadataBytes)
      .keepAliveTime(30, TimeUnit.SECONDS)
      .build()
    new WorkerClient(target, token, conf.grpcMaxMessageBytes, conf.rpcTimeoutMs, conf.runResponseTimeoutMs, channel,
      sharedMemoryBytes)
  }

  private def serializableCopy(t: Throwable): Throwable = {
    val (text, cause) = t match {
      case e: StatusRuntimeException => (s"gRPC ${e.getStatus.getCode}" +
        Option(e.getStatus.getDescription).map(": " + _).getOrElse(""), e.getStatus.getCause)
      case e: StatusException => (s"gRPC ${e.getStatus.getCode}" +
        Option(e.getStatus.getDescription).map(": " + _).getOrElse(""), e.getStatus.getCause)
      case e => (e.toString, e.getCause)
    }
    val copy = new RuntimeException(text, if (cause == null || (cause eq t)) null else serializableCopy(cause))
    copy.setStackTrace(t.getStackTrace)
    copy
  }

  private final class BearerTokenInterceptor(token: String) extends ClientInterceptor {
    override def interceptCall[Req, Resp](method: MethodDescriptor[Req, Resp], options: CallOptions,
        next: Channel): ClientCall[Req, Resp] =
      new ForwardingClientCall.SimpleForwardingClientCall[Req, Resp](next.newCall(method, options)) {
        override def start(listener: ClientCall.Listener[Resp], headers: Metadata): Unit = {
          if (token != null) headers.put(AuthorizationKey, s"Bearer $token")
          super.start(listener, headers)
        }
      }
  }

  /** Turns a gRPC failure of `method` on the worker at `target` into a typed [[FerryException]]. */
  def mapError(grpcError: Throwable, target: String, method: String, stage: String): FerryException = {
    val status = Status.fromThrowable(grpcError)
    val trailers = Status.trailersFromThrowable(grpcError)
    // gRPC's exceptions hold a Status, which is not serializable: keep a plain copy as the cause, so
    // the exception survives the trip from a task to the driver.
    val t = serializableCopy(grpcError)
    val err = Option(trailers).flatMap(m => Option(m.get(StageErrorKey)))
    val where = s"worker at $target, $method"
    err match {
      case Some(e) =>
        val st = if (e.getStage.nonEmpty) e.getStage else stage
        val what = s"${e.getExceptionType}: ${e.getMessage}"
        e.getCategory match {
          case "unknown_stage" =>
            new UnknownStageException(st, s"Unknown stage '$st' ($where): $what. Check the name, or load the " +
              s"module that registers it with ${FerryConf.WorkerStages}.", t)
          case "invalid_params" =>
            new InvalidParamsException(st, s"Invalid params for stage '$st' ($where): ${e.getMessage}", t)
          case "invalid_schema" =>
            new SchemaMismatchException(st, s"Input columns do not fit stage '$st' ($where): ${e.getMessage}", t)
          case "invalid_input" =>
            new InvalidInputException(st, s"Stage '$st' rejected its input ($where): ${e.getMessage}", t)
          case "unauthenticated" =>
            new AuthenticationException(s"The worker at $target refused the call to $method: ${e.getMessage}. " +
              s"Use the token the worker was started with (${FerryConf.WorkerToken} / ${FerryConf.WorkerTokenFile} " +
              "for a remote worker).", t)
          case "missing_resource" =>
            new MissingResourceException(st, s"Stage '$st' needs a resource the worker lacks ($where): ${e.getMessage}", t)
          case "protocol" =>
            new ProtocolException(s"Protocol error ($where): ${e.getMessage}. The JVM client and the Python " +
              "worker may be different ferry versions.", t)
          case _ /* stage_failed and anything newer */ =>
            val tb = if (e.getTraceback.nonEmpty) e.getTraceback else "(no traceback)"
            new PythonStageException(st, e.getExceptionType, e.getMessage, e.getTraceback,
              s"Python stage '$st' raised $what ($where).\nPython traceback:\n${tb.stripLineEnd}", t)
        }
      case None =>
        status.getCode match {
          case Status.Code.UNAUTHENTICATED =>
            new AuthenticationException(s"The worker at $target refused the call to $method: " +
              s"${status.getDescription}. Use the token the worker was started with.", t)
          case Status.Code.UNAVAILABLE | Status.Code.CANCELLED | Status.Code.UNKNOWN | Status.Code.ABORTED |
              Status.Code.DEADLINE_EXCEEDED | Status.Code.INTERNAL | Status.Code.RESOURCE_EXHAUSTED =>
            new WorkerUnavailableException(s"The worker at $target failed during $method" +
              (if (stage.nonEmpty) s" of stage '$stage'" else "") +
              s" with ${status.getCode}: ${Option(status.getDescription).getOrElse("")}" +
              Option(status.getCause).map(c => s" ($c)").getOrElse("") +
              ". The worker process died, was stopped or is unreachable; a new one will be started on the next " +
              "call (see the worker log for why it stopped).", t)
          case code =>
            new FerryException(s"The worker at $target failed during $method with $code: ${status.getDescription}", t)
        }
    }
  }
}

/**
 * One `Run` stream. Iterating it sends input batches (never more than `maxInFlight` ahead of the
 * answers) and yields output batch messages in input order. Call [[close]] when done; closing
 * a stream that has not finished cancels it.
 */
final class RunStream private[ferry] (client: WorkerClient, val stage: String, inputs: Iterator[ByteString],
    maxInFlight: Int, offered: Option[SharedFiles] = None) extends Iterator[ByteString] with AutoCloseable {

  import RunStream._

  private val events = new LinkedBlockingQueue[Event]()
  @volatile private var requests: ClientCallStreamObserver[RunRequest] = _
  private var sent = 0L
  private var received = 0L
  private var inputDone = false
  private var endSent = false
  private var sawEnd = false
  private var finished = false
  private var nextBatch: ByteString = _
  private var _outputSchema: ByteString = _
  private var _metrics: Option[Metrics] = None
  // The shared files, once the worker has accepted them; released when the stream ends.
  private var shared: Option[SharedFiles] = None
  private var sharedHeld = offered.isDefined
  private var _sharedBatches = 0L

  /** Input and output batches of this stream that went through shared memory. */
  def sharedBatches: Long = _sharedBatches

  /** Arrow IPC schema message of every output batch. */
  def outputSchema: ByteString = _outputSchema

  /** The worker's metrics, once the stream has ended. */
  def metrics: Option[Metrics] = _metrics

  /** Input batches sent so far. */
  def batchesSent: Long = sent

  private[ferry] def open(stub: WorkerGrpc.WorkerStub, open: Open): Unit = {
    val observer = new ClientResponseObserver[RunRequest, RunResponse] {
      override def beforeStart(r: ClientCallStreamObserver[RunRequest]): Unit = requests = r
      override def onNext(value: RunResponse): Unit = events.put(Response(value))
      override def onError(t: Throwable): Unit = events.put(Failed(t))
      override def onCompleted(): Unit = events.put(Completed)
    }
    // The Run method with ferry's response marshaller (see RunMethod).
    ClientCalls.asyncBidiStreamingCall(stub.getChannel.newCall(WorkerClient.RunMethod, stub.getCallOptions), observer)
    guard {
      requests.onNext(RunRequest.newBuilder().setOpen(open).build())
      take() match {
        case Response(r) if r.hasOpened =>
          _outputSchema = r.getOpened.getOutputSchema
          offered.foreach { f =>
            client.sharedAnswered(f, r.getOpened.getSharedMemory)
            if (r.getOpened.getSharedMemory) shared = Some(f) else releaseShared()
          }
        case Response(r) => throw new ProtocolException(s"Stage '$stage' on ${client.target} answered Open with " +
          s"${r.getMsgCase} instead of Opened.")
        case Failed(t) => throw WorkerClient.mapError(t, client.target, "Run", stage)
        case Completed => throw new ProtocolException(s"Stage '$stage' on ${client.target} closed the Run " +
          "stream before Opened.")
      }
    }
  }

  override def hasNext: Boolean = {
    if (nextBatch == null && !finished) guard(advance())
    nextBatch != null
  }

  override def next(): ByteString = {
    if (!hasNext) throw new NoSuchElementException(s"Run of stage '$stage' has no more batches")
    val b = nextBatch
    nextBatch = null
    b
  }

  private def advance(): Unit = {
    while (nextBatch == null && !finished) {
      val ev = events.poll()
      if (ev != null) handle(ev)
      else if (!inputDone && sent - received < maxInFlight) {
        if (inputs.hasNext) {
          val b = inputs.next()
          if (b.size() > client.maxMessageBytes) {
            throw new FerryException(s"An Arrow batch of ${b.size()} bytes for stage '$stage' exceeds the gRPC " +
              s"message limit of ${client.maxMessageBytes} bytes: a single row is too large. Raise " +
              s"${FerryConf.GrpcMaxMessageBytes} (also the limit of the workers ferry starts) or make rows smaller.")
          }
          requests.onNext(RunRequest.newBuilder().setBatch(batchMessage(b)).build())
          sent += 1
        } else inputDone = true
      } else if (inputDone && !endSent) {
        requests.onNext(RunRequest.newBuilder().setEnd(End.getDefaultInstance).build())
        requests.onCompleted()
        endSent = true
      } else handle(take())
    }
  }

  private def handle(ev: Event): Unit = ev match {
    case Response(r) =>
      r.getMsgCase match {
        case RunResponse.MsgCase.BATCH =>
          val batch = r.getBatch
          nextBatch = if (batch.getSharedLength > 0) {
            val f = shared.getOrElse(throw new ProtocolException(s"Stage '$stage' on ${client.target} answered " +
              "with a batch in shared memory that this stream did not agree on."))
            _sharedBatches += 1
            f.readOutput(batch.getSharedOffset, batch.getSharedLength)
          } else batch.getArrow
          received += 1
          // The worker copied input `received - 1` out before it answered it: its region is free.
          shared.foreach(_.inputRegions.release(this, received))
        case RunResponse.MsgCase.METRICS => _metrics = Some(r.getMetrics)
        case RunResponse.MsgCase.END => sawEnd = true
        case other => throw new ProtocolException(s"Unexpected $other in the Run stream of stage '$stage' " +
          s"from ${client.target}.")
      }
    case Failed(t) =>
      finished = true
      throw WorkerClient.mapError(t, client.target, "Run", stage)
    case Completed =>
      finished = true
      releaseShared()
      if (!sawEnd) throw new WorkerUnavailableException(s"The worker at ${client.target} closed the Run stream " +
        s"of stage '$stage' without End after $received of $sent batches; it may have died.")
  }

  /**
   * Waits for the next event, waking up to notice a killed Spark task, and giving up after the
   * client's response timeout: a worker stuck in a stage (a deadlock, an endless loop) keeps its
   * connection open, so gRPC alone would wait forever.
   */
  private def take(): Event = {
    var ev: Event = null
    val since = System.nanoTime()
    val timeout = client.responseTimeoutMs
    while (ev == null) {
      ev = events.poll(100, TimeUnit.MILLISECONDS)
      if (ev == null) {
        if (timeout > 0 && (System.nanoTime() - since) / 1000000L >= timeout) {
          throw new WorkerUnavailableException(s"Stage '$stage' on the worker at ${client.target} answered " +
            s"nothing for ${timeout / 1000.0}s with ${sent - received} batch(es) outstanding ($received of $sent " +
            s"answered); it looks stuck (a deadlock or an endless loop in the stage?), so the worker is replaced. " +
            s"If a batch legitimately takes longer, raise ${FerryConf.RunResponseTimeout} or send smaller batches " +
            s"(${FerryConf.BatchMaxRows}).")
        }
        val tc = TaskContext.get()
        if (tc != null && tc.isInterrupted()) throw new org.apache.spark.TaskKilledException("task killed while waiting for the worker")
        if (Thread.currentThread().isInterrupted) throw new InterruptedException(s"Run of stage '$stage' interrupted")
      }
    }
    ev
  }

  private def guard[T](body: => T): T =
    try body
    catch {
      case t: Throwable =>
        cancel(t.toString)
        throw t
    }

  private def cancel(why: String): Unit = {
    if (!finished) {
      finished = true
      val r = requests
      if (r != null) r.cancel(s"client gave up: $why", null)
    }
    releaseShared()
  }

  /** An input batch: in the shared input file when it fits there now, else inline. */
  private def batchMessage(b: ByteString): Batch.Builder = {
    val m = Batch.newBuilder().setOutputsRead(received)
    shared.flatMap(f => f.inputRegions.alloc(b.size().toLong, this, sent).map(f -> _)) match {
      case Some((f, offset)) =>
        f.writeInput(offset, b)
        _sharedBatches += 1
        m.setSharedOffset(offset).setSharedLength(b.size().toLong)
      case None => m.setArrow(b)
    }
  }

  private def releaseShared(): Unit = if (sharedHeld) {
    sharedHeld = false
    offered.foreach { f =>
      f.inputRegions.release(this)
      f.release()
    }
    shared = None
  }

  /** Whether the stream ran to its End. */
  def completed: Boolean = finished && sawEnd

  override def close(): Unit = cancel("closed before the end of the stream")
}

private object RunStream {
  private sealed trait Event
  private final case class Response(r: RunResponse) extends Event
  private final case class Failed(t: Throwable) extends Event
  private case object Completed extends Event
}
