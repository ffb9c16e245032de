package ferry

import com.google.protobuf.ByteString
import org.apache.arrow.memory.BufferAllocator
import org.apache.arrow.vector.{BigIntVector, BitVector, BitVectorHelper, Float8Vector, VectorSchemaRoot}
import org.apache.arrow.vector.types.pojo.Schema
import org.apache.spark.TaskContext
import org.apache.spark.broadcast.Broadcast
import org.apache.spark.ml.Transformer
import org.apache.spark.ml.param.{DoubleArrayParam, Param, ParamMap, Params}
import org.apache.spark.ml.util.{DefaultParamsReadable, DefaultParamsWritable, Identifiable}
import org.apache.spark.rdd.RDD
import org.apache.spark.sql.{DataFrame, Dataset, Row}
import org.apache.spark.sql.catalyst.InternalRow
import org.apache.spark.sql.vectorized.ColumnarBatch
import org.apache.spark.unsafe.Platform
import org.apache.spark.sql.ferry.InternalFrames
import org.apache.spark.sql.functions.{col, lit}
import org.apache.spark.sql.types._
import org.slf4j.LoggerFactory

import scala.jdk.CollectionConverters._

import ferry.ConvolvePlan._

/** Params of [[Convolve]]. */
trait ConvolveParams extends Params {

  /** Column of sample ids, the dense range 0..N-1 (bigint or int). Default: "id". */
  final val idCol: Param[String] = new Param[String](this, "idCol",
    "column of sample ids, the dense range 0..N-1 (bigint or int; default id)", (s: String) => s != null && s.nonEmpty)

  /** Column of the samples' real parts (double or float). Default: "real". */
  final val realCol: Param[String] = new Param[String](this, "realCol",
    "column of the samples' real parts (double or float; default real)", (s: String) => s != null && s.nonEmpty)

  /** Column of the samples' imaginary parts (double or float); empty for a real series. Default: "imag". */
  final val imagCol: Param[String] = new Param[String](this, "imagCol",
    "column of the samples' imaginary parts (double or float); empty string for a real-valued series (default imag)",
    (s: String) => s != null)

  /** Real parts of the kernel taps; required, at least one tap. */
  final val kernelReal: DoubleArrayParam = new DoubleArrayParam(this, "kernelReal",
    "real parts of the kernel taps (required, at least one)")

  /** Imaginary parts of the kernel taps: empty (all zero, the default) or one per tap. */
  final val kernelImag: DoubleArrayParam = new DoubleArrayParam(this, "kernelImag",
    "imaginary parts of the kernel taps: empty = all zero (default), else one per tap")

  /** numpy.convolve mode: "full", "same" (default) or "valid". */
  final val mode: Param[String] = new Param[String](this, "mode",
    "numpy.convolve mode: full, same or valid (default same)", (s: String) => s != null)

  setDefault(idCol -> "id", realCol -> "real", imagCol -> "imag", kernelImag -> Array.empty[Double], mode -> "same")

  def getIdCol: String = $(idCol)
  def getRealCol: String = $(realCol)
  def getImagCol: String = $(imagCol)
  def getKernelReal: Array[Double] = $(kernelReal)
  def getKernelImag: Array[Double] = $(kernelImag)
  def getMode: String = $(mode)

  /** Name of the output's imaginary column: imagCol, or "imag" for a real-valued input. */
  def outputImagCol: String = if ($(imagCol).isEmpty) "imag" else $(imagCol)
}

/**
 * Exact 1-D discrete convolution with numpy.convolve semantics of a (complex or real) series
 * stored one sample per row, however the DataFrame is partitioned.
 *
 * Input: `idCol` (bigint or int) holding the dense range 0..N-1, `realCol` and, unless
 * `imagCol` is empty, `imagCol` (double or float). Other columns are ignored and DROPPED: the
 * output has one row per output sample o of `numpy.convolve(x, kernel, mode)`, with columns
 * `idCol` (bigint, = o), `realCol` (double) and `imagCol` or "imag" (double), so
 * `full` gives N+L-1 rows, `same` max(N, L) and `valid` max(N, L) - min(N, L) + 1.
 *
 * How: a JVM-only pass finds each partition's runs of consecutive ids (re-laying out the data
 * by id if it is scattered, e.g. after `repartition(n)`) and, in the same tasks, each run's first
 * samples; the driver checks the ids tile 0..N-1 and gives each run the samples after it that
 * it needs (its halo, see [[ConvolvePlan]]);
 * then each partition streams its runs with their halos through a pooled Python worker
 * running the `convolve` stage. `transform` runs the planning pass (a Spark job) right away and
 * returns a DataFrame whose computation is lazy as usual. The input is read twice: cache it if
 * it is expensive or not deterministic. Batch DataFrames only: a streaming DataFrame never holds
 * the whole series.
 *
 * {{{
 *   val y = new Convolve().setKernelReal(Array(0.25, 0.5, 0.25)).setMode("same").transform(series)
 * }}}
 */
class Convolve(override val uid: String) extends Transformer with ConvolveParams with DefaultParamsWritable {

  def this() = this(Identifiable.randomUID("convolve"))

  def setIdCol(value: String): this.type = set(idCol, value)
  def setRealCol(value: String): this.type = set(realCol, value)
  def setImagCol(value: String): this.type = set(imagCol, value)
  def setKernelReal(value: Array[Double]): this.type = set(kernelReal, value)
  def setKernelImag(value: Array[Double]): this.type = set(kernelImag, value)
  def setMode(value: String): this.type = set(mode, value)

  private def names = Names($(idCol), $(realCol), if ($(imagCol).isEmpty) "" else $(imagCol))

  private def taps: Int = $(kernelReal).length

  private def checkParams(): Unit = {
    if (!isDefined(kernelReal)) {
      throw new InvalidParamsException(Convolve.Stage, "Convolve needs a kernel: call setKernelReal(taps) " +
        "(and setKernelImag for a complex kernel).")
    }
    if ($(kernelReal).isEmpty) {
      throw new InvalidParamsException(Convolve.Stage, "kernelReal is empty; a kernel needs at least one tap.")
    }
    val im = $(kernelImag)
    if (im.nonEmpty && im.length != taps) {
      throw new InvalidParamsException(Convolve.Stage, s"kernelImag has ${im.length} values but kernelReal has " +
        s"$taps; give one imaginary part per tap, or none for a real kernel.")
    }
    if (!Convolve.Modes.contains($(mode))) {
      throw new InvalidParamsException(Convolve.Stage, s"mode must be one of ${Convolve.Modes.mkString(", ")} " +
        s"(numpy.convolve's modes), got '${$(mode)}'.")
    }
  }

  private def checkColumns(schema: StructType): Unit = {
    def need(name: String, role: String, ok: Set[DataType], okText: String): Unit =
      schema.find(_.name == name) match {
        case None =>
          throw new SchemaMismatchException(Convolve.Stage, s"Convolve's $role column '$name' does not exist; the " +
            s"DataFrame has ${schema.fieldNames.mkString(", ")}. Rename the column or set the matching *Col param.")
        case Some(f) if !ok.contains(f.dataType) =>
          throw new SchemaMismatchException(Convolve.Stage, s"Convolve's $role column '$name' must be $okText, " +
            s"found ${f.dataType.simpleString}. Cast it, e.g. col(\"$name\").cast(\"${okText.split(" ").head}\").")
        case _ =>
      }
    need($(idCol), "id", Set(LongType, IntegerType), "bigint or int")
    need($(realCol), "real", Set(DoubleType, FloatType), "double or float")
    if ($(imagCol).nonEmpty) need($(imagCol), "imag", Set(DoubleType, FloatType), "double or float")
    val outs = Seq($(idCol), $(realCol), outputImagCol)
    if (outs.distinct.length != outs.length) {
      throw new SchemaMismatchException(Convolve.Stage, s"Convolve's output columns ${outs.mkString(", ")} must " +
        "be distinct; set idCol, realCol and imagCol to different names.")
    }
  }

  private[ferry] def paramsJson(length: Long): String = Json.encode(Map(
    "kernel_real" -> $(kernelReal).toSeq,
    "kernel_imag" -> $(kernelImag).toSeq,
    "mode" -> $(mode),
    "length" -> length))

  override def transformSchema(schema: StructType): StructType = {
    val out = checkedOutputSchema(schema)
    checkWithWorker(PythonStage.activeConf)
    out
  }

  /** The output schema, once the params and the input's columns pass the JVM's own checks. */
  private def checkedOutputSchema(schema: StructType): StructType = {
    checkParams()
    checkColumns(schema)
    Convolve.outputSchema($(idCol), $(realCol), outputImagCol)
  }

  /** The worker validates the params too (the stage contract is the one source of truth). */
  private def checkWithWorker(conf: FerryConf): Unit = {
    val described = WorkerPool.get(conf).withClient(
      _.describe(Convolve.Stage, paramsJson(-1L), Some(Convolve.WireSchema)))
    val wire = described.outputSchema.getOrElse(throw new ProtocolException(
      "The worker's Describe of 'convolve' returned no output schema."))
    // Its batches become this transformer's rows as they are, so the columns must match in order.
    if (wire.map(f => f.name -> f.dataType) != Seq("id" -> LongType, "real" -> DoubleType, "imag" -> DoubleType)) {
      throw new ProtocolException(s"The worker's 'convolve' stage returns ${wire.simpleString}, expected " +
        "id bigint, real double, imag double: the worker and this jar are different ferry versions.")
    }
  }

  override def transform(dataset: Dataset[_]): DataFrame = {
    if (dataset.isStreaming) {
      throw new InvalidInputException(Convolve.Stage, "Convolve cannot run on a streaming DataFrame: every output " +
        "sample may depend on samples anywhere in the series, so it needs the whole series (ids 0..N-1) at once. " +
        "Collect each complete series first, e.g. convolve inside foreachBatch or on a batch DataFrame.")
    }
    val outSchema = checkedOutputSchema(dataset.schema)
    val spark = dataset.sparkSession
    val conf = FerryConf.get(spark)
    val nm = names
    val k = taps - 1
    val imagExpr = if ($(imagCol).isEmpty) lit(0.0) else col(s"`${$(imagCol)}`").cast(DoubleType)
    val selected = dataset.select(col(s"`${$(idCol)}`").cast(LongType).as("id"),
      col(s"`${$(realCol)}`").cast(DoubleType).as("real"), imagExpr.as("imag"))

    // The worker check below needs one worker: start it before planning the scans (cold, the
    // query planning takes most of a second), the others once the partitions are known.
    WorkerPool.prestartLocal(spark, conf, 1)
    val (columns, firstSource) = sourceOf(dataset, selected)
    var source = firstSource
    WorkerPool.prestartLocal(spark, conf, source.numPartitions)
    // The worker's check waits for a worker to start (about a second, cold): it runs beside the
    // planning job, which needs no worker, and its verdict is awaited before the compute job exists.
    val workerChecked = scala.concurrent.Future(checkWithWorker(conf))(scala.concurrent.ExecutionContext.global)
    // The footers are read on the driver while the planning job runs (they decide whether the
    // value columns need a query for nulls; the planning pass no longer reads those columns).
    val footersClear = columns.filter(_ => !source.planChecksValues).map(df => scala.concurrent.Future(
      Convolve.footersCountNoNulls(df, df.columns.tail.toSeq))(scala.concurrent.ExecutionContext.global))
    // A plain Parquet scan whose footers tile the ids needs no pass over them: only its heads are read.
    val fromFooters = columns.filter(_ => source.isInstanceOf[Convolve.ColumnarSource])
      .flatMap(df => ParquetRuns.plans(df, source.numPartitions, conf.convolveMaxRunsPerPartition))
    var (plans, heads) = fromFooters match {
      case Some(footerPlans) => (footerPlans, Convolve.headsAnyOrder(source, nm, footerPlans, k))
      case None => Convolve.planWithHeads(source, nm, conf.convolveMaxRunsPerPartition, k)
    }
    if (plans.exists(_.abandoned)) {
      val parts = math.max(1, source.numPartitions)
      Convolve.log.info(s"A partition holds more than ${conf.convolveMaxRunsPerPartition} runs of " +
        s"consecutive ids (${FerryConf.ConvolveMaxRuns}); re-laying out the series by id into $parts partitions.")
      source = Convolve.RowSource(selected.repartitionByRange(parts, col("id")).sortWithinPartitions("id")
        .queryExecution.toRdd)
      val replanned = Convolve.planWithHeads(source, nm, Int.MaxValue, k)
      plans = replanned._1
      heads = replanned._2
    }
    if (!source.planChecksValues) {
      val clear = footersClear.exists(f => scala.concurrent.Await.result(f, scala.concurrent.duration.Duration.Inf))
      if (!clear) columns.foreach(Convolve.queryForNullValues(_, nm))
    }
    scala.concurrent.Await.result(workerChecked, scala.concurrent.duration.Duration.Inf)
    val m = $(mode)
    val l = taps
    val computePlan = ConvolvePlan.computePlan(plans.toSeq, heads, n => haloSizes(n, l, m)._1, k, nm,
      inOrder = fromFooters.isEmpty)
    if (computePlan.n == 0) {
      return spark.createDataFrame(java.util.Collections.emptyList[Row](), outSchema)
    }
    val bc = spark.sparkContext.broadcast(computePlan)
    val params = paramsJson(computePlan.n)
    val out = source.chunks(nm).mapPartitionsWithIndex((pid, chunks) =>
      Convolve.computePartition(pid, chunks, bc, params, conf, nm.id))
    InternalFrames.create(spark, out, outSchema)
  }

  /**
   * The input's columns as they are (None for a real series), and where the samples come from:
   * a columnar scan of those columns (bigint, double, double) is read in column batches, its ids
   * alone for the planning pass when the scan can give them alone (Parquet can); anything else
   * as rows of `selected`, the columns with their casts.
   */
  private[ferry] def sourceOf(dataset: Dataset[_], selected: DataFrame): (Option[DataFrame], Convolve.Source) = {
    val columns = if ($(imagCol).isEmpty) None
      else Some(dataset.select(col(s"`${$(idCol)}`"), col(s"`${$(realCol)}`"), col(s"`${$(imagCol)}`")))
    val source = columns.flatMap(df => SampleChunks.columnarSource(df).map { case (rdd, ordinals) =>
      val ids = SampleChunks.columnarSource(df.select(col(s"`${df.columns.head}`")), Seq(LongType))
        .filter(_._1.getNumPartitions == rdd.getNumPartitions)
      Convolve.ColumnarSource(rdd, ordinals, ids.map { case (r, o) => (r, o(0)) })
    }).getOrElse(Convolve.RowSource(selected.queryExecution.toRdd))
    (columns, source)
  }

  override def copy(extra: ParamMap): Convolve = defaultCopy(extra)
}

object Convolve extends DefaultParamsReadable[Convolve] {

  private val log = LoggerFactory.getLogger(classOf[Convolve])

  /** Name of the worker stage. */
  val Stage = "convolve"

  val Modes: Seq[String] = Seq("full", "same", "valid")

  /** The columns sent to the worker (the convolve stage's input, python/ferry/stages/convolve.py). */
  private[ferry] val WireSchema: StructType = StructType(Seq(
    StructField("id", LongType, nullable = false), StructField("real", DoubleType, nullable = false),
    StructField("imag", DoubleType, nullable = false), StructField("halo", BooleanType, nullable = false)))

  private[ferry] def outputSchema(id: String, real: String, imag: String): StructType = StructType(Seq(
    StructField(id, LongType, nullable = false), StructField(real, DoubleType, nullable = false),
    StructField(imag, DoubleType, nullable = false)))

  override def load(path: String): Convolve = super.load(path)

  private def changed(detail: String) = new InvalidInputException(Stage, "Convolve's input changed between its " +
    s"planning pass and its compute pass: $detail. The DataFrame must give the same rows in the same order each " +
    "time it is computed: cache() or checkpoint() it before Convolve (e.g. when it comes from a random source or " +
    "an unordered shuffle).")

  /** Where a partition's samples come from: Spark rows, or a columnar scan's batches. */
  private[ferry] sealed trait Source {
    def numPartitions: Int
    /** The samples in chunks; `forPlanning` chunks need only be readable until the next one. */
    def chunks(names: Names, forPlanning: Boolean = false): RDD[SampleChunk]
    /** The ids in chunks (their values not read), for the planning pass. */
    def idChunks(names: Names): RDD[SampleChunk]
    /** Whether the planning pass also finds null values (else the footers or [[queryForNullValues]] must). */
    def planChecksValues: Boolean
  }

  private[ferry] final case class RowSource(rdd: RDD[InternalRow]) extends Source {
    def numPartitions: Int = rdd.getNumPartitions
    def chunks(names: Names, forPlanning: Boolean): RDD[SampleChunk] =
      rdd.mapPartitionsWithIndex((pid, rows) => SampleChunks.fromRows(rows, names, pid), preservesPartitioning = true)
    // Rows come whole: checking their values for nulls costs nothing more.
    def idChunks(names: Names): RDD[SampleChunk] = rdd.mapPartitionsWithIndex(
      (pid, rows) => SampleChunks.fromRows(rows, names, pid, copyValues = false), preservesPartitioning = true)
    def planChecksValues: Boolean = true
  }

  /** A columnar scan; `ids`, when given, is a scan of the id column alone (batches, ordinal). */
  private[ferry] final case class ColumnarSource(rdd: RDD[ColumnarBatch], ordinals: Array[Int],
      ids: Option[(RDD[ColumnarBatch], Int)] = None) extends Source {
    def numPartitions: Int = rdd.getNumPartitions
    def chunks(names: Names, forPlanning: Boolean): RDD[SampleChunk] = rdd.mapPartitionsWithIndex(
      (pid, batches) => SampleChunks.fromBatches(batches, ordinals, names, pid, copyValues = !forPlanning),
      preservesPartitioning = true)
    def idChunks(names: Names): RDD[SampleChunk] = ids match {
      case Some((idRdd, ordinal)) => idRdd.mapPartitionsWithIndex(
        (pid, batches) => SampleChunks.idsFromBatches(batches, ordinal, names, pid), preservesPartitioning = true)
      case None => chunks(names, forPlanning = true)
    }
    def planChecksValues: Boolean = ids.isEmpty
  }

  /**
   * Fails naming the first null of the value columns, if any, found by a query (on Parquet
   * answered mostly from the row groups' statistics). A Parquet series whose footers count no
   * nulls in them (Spark writes the counts) needs no query: see [[footersCountNoNulls]].
   */
  private[ferry] def queryForNullValues(columns: DataFrame, names: Names): Unit = FerryException.unwrapping {
    val Array(id, re, im) = columns.columns.map(c => col(s"`$c`"))
    columns.where(re.isNull || im.isNull).select(id, re.isNull).limit(1).collect().headOption.foreach { row =>
      throw SampleChunks.nullValue(if (row.getBoolean(1)) names.real else names.imag, row.getLong(0))
    }
  }

  /** True when `df` reads Parquet files whose every row group counts 0 nulls in `columns`; false when unsure. */
  private[ferry] def footersCountNoNulls(df: DataFrame, columns: Seq[String]): Boolean = try {
    val files = df.inputFiles
    val parquet = df.queryExecution.executedPlan.collectFirst {
      case s: org.apache.spark.sql.execution.FileSourceScanExec =>
        s.relation.fileFormat.isInstanceOf[org.apache.spark.sql.execution.datasources.parquet.ParquetFileFormat]
    }.getOrElse(false)
    if (!parquet || files.isEmpty || files.length > ParquetRuns.MaxFooterReads) return false
    val hconf = df.sparkSession.sparkContext.hadoopConfiguration
    files.forall { f =>
      val reader = org.apache.parquet.hadoop.ParquetFileReader.open(
        org.apache.parquet.hadoop.util.HadoopInputFile.fromPath(new org.apache.hadoop.fs.Path(new java.net.URI(f)), hconf))
      try {
        reader.getFooter.getBlocks.asScala.forall { block =>
          columns.forall { c =>
            block.getColumns.asScala.find(_.getPath.toDotString.equalsIgnoreCase(c)).exists { m =>
              val st: org.apache.parquet.column.statistics.Statistics[_] = m.getStatistics
              st != null && st.isNumNullsSet && st.getNumNulls == 0
            }
          }
        }
      } finally reader.close()
    }
  } catch {
    case scala.util.control.NonFatal(e) =>
      log.debug(s"Parquet footers not read for the null check (${e.getMessage}); querying instead")
      false
  }

  /**
   * The planning job: each task plans its partition from the ids, then reads the heads of its
   * runs (see [[ConvolvePlan]]) from a second scan of the same partition that stops after the
   * last head (for a partition holding one run, after its first batch). One job instead of a
   * planning job and a heads job; a partition whose plan is abandoned reads no heads.
   */
  private[ferry] def planWithHeads(source: Source, names: Names, maxRuns: Int,
      k: Int): (Array[PartitionPlan], Map[(Int, Int), Head]) = FerryException.unwrapping {
    val planned = source.idChunks(names).zipPartitions(source.chunks(names, forPlanning = true)) { (ids, samples) =>
      val pid = TaskContext.getPartitionId()
      val plan = planPartition(pid, ids, maxRuns)
      val wanted = if (plan.abandoned) Array.empty[(Int, Long, Int)] else wantedHeads(plan, k)
      // The second scan is opened only here, when the partition has heads to give.
      val heads = if (wanted.isEmpty) Array.empty[(Int, Head)]
        else ConvolvePlan.readHeads(pid, samples, plan.runs, wanted, changed)
      Iterator((plan, heads))
    }.collect()
    (planned.map(_._1), planned.iterator.flatMap { case (p, hs) =>
      hs.iterator.map { case (ri, h) => (p.partition, ri) -> h } }.toMap)
  }

  /**
   * The heads of runs planned from Parquet footers (see [[ParquetRuns]]): one job whose tasks
   * read their partition only until their runs' first ids are found (in order: their first rows).
   */
  private[ferry] def headsAnyOrder(source: Source, names: Names, plans: Array[PartitionPlan],
      k: Int): Map[(Int, Int), Head] = FerryException.unwrapping {
    val wanted = plans.map(p => p.partition -> wantedHeads(p, k)).filter(_._2.nonEmpty).toMap
    if (wanted.isEmpty) return Map.empty
    val runsOf = plans.map(p => p.partition -> p.runs).toMap
    source.chunks(names, forPlanning = true).mapPartitionsWithIndex { (pid, chunks) =>
      wanted.get(pid) match {
        case Some(w) => ConvolvePlan.readHeadsAnyOrder(pid, chunks, runsOf(pid), w, changed, names.id)
          .iterator.map { case (ri, h) => (pid, ri) -> h }
        case None => Iterator.empty
      }
    }.collect().toMap
  }

  /** Streams one partition's runs with their halos through a pooled worker. */
  private[ferry] def computePartition(pid: Int, chunks: Iterator[SampleChunk], bc: Broadcast[ComputePlan],
      paramsJson: String, conf: FerryConf, idName: String): Iterator[InternalRow] = {
    val runs = bc.value.partitions.getOrElse(pid, Array.empty[RunPlan])
    if (runs.isEmpty) {
      if (chunks.exists(_.n > 0)) throw changed(s"partition $pid was empty when planned and now has rows")
      return Iterator.empty
    }
    val runner = new StageRunner(conf, Stage)
    val groups = ConvolvePlan.streamGroups(runs)
    val lastGroup = groups.length - 1
    val cursor = new ChunkCursor(chunks)
    // Fixed-width rows (8 + 8 + 8 bytes and two bits) under both batch caps.
    val rowsPerBatch = math.max(1L, math.min(conf.batchMaxRows.toLong, (conf.batchMaxBytes - 1024) / 25)).toInt
    val output = groups.iterator.zipWithIndex.flatMap { case (group, g) =>
      val input = new RunMessages(pid, group, cursor, g == lastGroup, rowsPerBatch, runner.bufferAllocator,
        bc.value.inOrder, idName)
      runner.streamMessages(Stage, paramsJson, input.schema, input, input)(
        (reader, msg) => Iterator.single(reader.load(msg)))
    }
    ArrowBatches.rows(runner.closingAfter(output))
  }

  /** A read position in a partition's chunks, shared by the groups of runs streamed in turn. */
  private final class ChunkCursor(chunks: Iterator[SampleChunk]) {
    var chunk: SampleChunk = _
    var pos = 0

    /** Samples left in the current chunk, moving to the next non-empty one; 0 at the end. */
    def available(): Int = {
      while ((chunk == null || pos >= chunk.n) && chunks.hasNext) {
        chunk = chunks.next()
        pos = 0
      }
      if (chunk == null) 0 else chunk.n - pos
    }
  }

  /**
   * The record batches sent for a group of runs: for each run its own samples as they arrive
   * from Spark (checked against the plan), then the samples after it from the plan; rows whose
   * ids the run does not own are flagged halo. Columns are filled in bulk straight from the chunks.
   */
  private final class RunMessages(pid: Int, runs: Array[RunPlan], in: ChunkCursor, checkEnd: Boolean,
      rowsPerBatch: Int, allocator: BufferAllocator, inOrder: Boolean, idName: String)
      extends Iterator[ByteString] with AutoCloseable {
    val schema: Schema = ArrowBatches.toArrowSchema(WireSchema, Stage)
    private val root = VectorSchemaRoot.create(schema, allocator)
    private val idV = root.getVector(0).asInstanceOf[BigIntVector]
    private val reV = root.getVector(1).asInstanceOf[Float8Vector]
    private val imV = root.getVector(2).asInstanceOf[Float8Vector]
    private val haloV = root.getVector(3).asInstanceOf[BitVector]
    root.getFieldVectors.forEach { v =>
      v.setInitialCapacity(rowsPerBatch)
      v.allocateNew()
    }
    private var r = 0 // run index
    private var phase = 0 // 0 own samples, 1 the samples after the run
    private var i = 0L // index within the phase
    private var endChecked = false
    // The rest of the current run placed by id, once its rows came out of order (runs from
    // Parquet footers only): samples of ids run.start + placedAt + q at q.
    private var placedRe: Array[Double] = _
    private var placedIm: Array[Double] = _
    private var placedAt = 0L

    /** Skips finished phases; false when every run is sent (then checks the partition ended too). */
    private def settle(): Boolean = {
      while (r < runs.length) {
        val p = runs(r)
        val size = if (phase == 0) p.run.length else p.extRe.length.toLong
        if (i < size) return true
        phase += 1
        i = 0
        if (phase == 2) { phase = 0; r += 1 }
      }
      if (checkEnd && !endChecked) {
        endChecked = true
        if (in.available() > 0) {
          throw changed(s"partition $pid has more rows than planned (id ${in.chunk.ids(in.pos)})")
        }
      }
      false
    }

    override def hasNext: Boolean = settle()

    override def next(): ByteString = {
      if (!settle()) throw new NoSuchElementException
      var n = 0
      while (n < rowsPerBatch && settle()) {
        val p = runs(r)
        n = if (phase == 0) own(n, p) else after(n, p)
      }
      // No sample is null: every row is valid. The halo flags were set row by row (halo rows
      // are few); the vectors come zeroed from allocateNew / reset.
      val validBytes = (n + 7) / 8
      root.getFieldVectors.forEach(v => v.getValidityBuffer.setOne(0L, validBytes.toLong))
      ArrowBatches.serializeAndReset(root, n)
    }

    // The vectors are filled with bulk copies from the chunks' arrays: per-element set() calls
    // check bounds and set a validity bit each, and took most of the compute pass's JVM time.
    private def putSamples(n: Int, firstId: Long, re: Array[Double], im: Array[Double], from: Int, m: Int,
        p: RunPlan): Unit = {
      val ids = idV.getDataBufferAddress + 8L * n
      var j = 0
      while (j < m) {
        Platform.putLong(null, ids + 8L * j, firstId + j)
        j += 1
      }
      val src = Platform.DOUBLE_ARRAY_OFFSET + 8L * from
      Platform.copyMemory(re, src, null, reV.getDataBufferAddress + 8L * n, 8L * m)
      Platform.copyMemory(im, src, null, imV.getDataBufferAddress + 8L * n, 8L * m)
      // Halo flags for the rows outside [ownFrom, ownUntil): at most kernel length - 1 per run.
      val lo = math.min(math.max(p.ownFrom - firstId, 0L), m.toLong).toInt
      val hi = math.max(math.min(math.max(p.ownUntil - firstId, 0L), m.toLong).toInt, lo)
      j = 0
      while (j < lo) { BitVectorHelper.setBit(haloV.getDataBuffer, (n + j).toLong); j += 1 }
      j = hi
      while (j < m) { BitVectorHelper.setBit(haloV.getDataBuffer, (n + j).toLong); j += 1 }
    }

    private def after(n: Int, p: RunPlan): Int = {
      val m = math.min(rowsPerBatch - n, p.extRe.length - i.toInt)
      putSamples(n, p.run.end + i, p.extRe, p.extIm, i.toInt, m, p)
      i += m
      n + m
    }

    private def own(n: Int, p: RunPlan): Int = {
      val run = p.run
      val expected = run.start + i
      if (placedRe != null) {
        val m = math.min((rowsPerBatch - n).toLong, run.length - i).toInt
        val from = (i - placedAt).toInt
        checkHead(p, placedRe, placedIm, from, m)
        putSamples(n, expected, placedRe, placedIm, from, m, p)
        i += m
        if (i == run.length) { placedRe = null; placedIm = null }
        return n + m
      }
      val avail = in.available()
      if (avail == 0) throw changed(s"partition $pid ended before id $expected")
      var m = math.min(math.min(rowsPerBatch - n, avail).toLong, run.length - i).toInt
      val c = in.chunk
      val off = in.pos
      var j = 0
      while (j < m && c.ids(off + j) == expected + j) j += 1
      val outOfOrder = j < m
      if (outOfOrder) {
        if (inOrder) {
          throw changed(s"partition $pid gave id ${c.ids(off + j)} where the plan had id ${expected + j}")
        }
        m = j // the rows in order so far go now; the rest of the run is placed by id
      }
      checkHead(p, c.re, c.im, off, m)
      putSamples(n, expected, c.re, c.im, off, m, p)
      in.pos += m
      i += m
      if (outOfOrder) place(p)
      n + m
    }

    /** The head the planning job read (and sent to the run before) must read the same now. */
    private def checkHead(p: RunPlan, re: Array[Double], im: Array[Double], from: Int, m: Int): Unit = {
      var s = i
      val until = math.min(p.head.re.length.toLong, i + m)
      while (s < until) {
        val at = from + (s - i).toInt
        if (!(sameBits(re(at), p.head.re(s.toInt)) && sameBits(im(at), p.head.im(s.toInt)))) {
          throw changed(s"the value of id ${p.run.start + s} differs")
        }
        s += 1
      }
    }

    /**
     * Reads the run's remaining rows (as many as the footers count) into arrays by id: each id
     * in [run.start + i, run.end) exactly once, or the input is not what the footers say.
     */
    private def place(p: RunPlan): Unit = {
      val run = p.run
      val rest = run.length - i
      if (rest > Int.MaxValue - 16) {
        throw new InvalidInputException(Stage, s"partition $pid holds ${run.length} samples with ids out of order " +
          "in one run; sort the series by id (sortWithinPartitions) before Convolve.")
      }
      val base = run.start + i
      val re = new Array[Double](rest.toInt)
      val im = new Array[Double](rest.toInt)
      val seen = new java.util.BitSet(rest.toInt)
      var got = 0L
      while (got < rest) {
        val avail = in.available()
        if (avail == 0) throw changed(s"partition $pid ended before id ${base + seen.nextClearBit(0)}")
        val take = math.min(avail.toLong, rest - got).toInt
        ConvolvePlan.placeById(in.chunk, in.pos, take, run, base, re, im, seen, idName,
          id => changed(s"partition $pid gave id $id among the rows of ids [${run.start}, ${run.end})"))
        in.pos += take
        got += take
      }
      placedRe = re
      placedIm = im
      placedAt = i
    }

    private def sameBits(a: Double, b: Double) =
      java.lang.Double.doubleToLongBits(a) == java.lang.Double.doubleToLongBits(b)

    override def close(): Unit = root.close()
  }
}
