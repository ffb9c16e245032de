package ferry

import org.apache.spark.broadcast.Broadcast
import org.apache.spark.ml.Transformer
import org.apache.spark.ml.param.{DoubleArrayParam, Param, ParamMap, Params}
import org.apache.spark.ml.util.{DefaultParamsReadable, DefaultParamsWritable, Identifiable}
import org.apache.spark.rdd.RDD
import org.apache.spark.sql.{DataFrame, Dataset, Row}
import org.apache.spark.sql.catalyst.InternalRow
import org.apache.spark.sql.catalyst.expressions.{GenericRow, SpecificInternalRow}
import org.apache.spark.sql.functions.{col, lit}
import org.apache.spark.sql.types._
import org.slf4j.LoggerFactory

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
 * How: a JVM-only pass finds each partition's runs of consecutive ids and their edge samples
 * (re-laying out the data by id if it is scattered, e.g. after `repartition(n)`); the driver
 * checks the ids tile 0..N-1 and gives each run the neighbouring samples it needs (its halos);
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
    checkParams()
    checkColumns(schema)
    // The worker validates the params too: the one source of truth for the stage.
    val described = WorkerPool.get(PythonStage.activeConf).withClient(
      _.describe(Convolve.Stage, paramsJson(-1L), Some(Convolve.WireSchema)))
    val wire = described.outputSchema.getOrElse(throw new ProtocolException(
      "The worker's Describe of 'convolve' returned no output schema."))
    Seq("id" -> LongType, "real" -> DoubleType, "imag" -> DoubleType).foreach { case (n, t) =>
      if (!wire.find(_.name == n).exists(_.dataType == t)) {
        throw new ProtocolException(s"The worker's 'convolve' stage returns ${wire.simpleString}, expected " +
          "id bigint, real double, imag double: the worker and this jar are different ferry versions.")
      }
    }
    Convolve.outputSchema($(idCol), $(realCol), outputImagCol)
  }

  override def transform(dataset: Dataset[_]): DataFrame = {
    if (dataset.isStreaming) {
      throw new InvalidInputException(Convolve.Stage, "Convolve cannot run on a streaming DataFrame: every output " +
        "sample may depend on samples anywhere in the series, so it needs the whole series (ids 0..N-1) at once. " +
        "Collect each complete series first, e.g. convolve inside foreachBatch or on a batch DataFrame.")
    }
    val outSchema = transformSchema(dataset.schema)
    val spark = dataset.sparkSession
    val conf = FerryConf.get(spark)
    val nm = names
    val k = taps - 1
    val imagExpr = if ($(imagCol).isEmpty) lit(0.0) else col(s"`${$(imagCol)}`").cast(DoubleType)
    val selected = dataset.select(col(s"`${$(idCol)}`").cast(LongType).as("id"),
      col(s"`${$(realCol)}`").cast(DoubleType).as("real"), imagExpr.as("imag"))

    def plan(rdd: RDD[InternalRow], maxRuns: Int): Array[PartitionPlan] = FerryException.unwrapping {
      rdd.mapPartitionsWithIndex((pid, rows) => Iterator(planPartition(pid, rows, k, maxRuns, nm))).collect()
    }

    var rdd = selected.queryExecution.toRdd
    Convolve.prestartLocal(spark, conf, rdd.getNumPartitions)
    var plans = plan(rdd, conf.convolveMaxRunsPerPartition)
    if (plans.exists(_.abandoned)) {
      val parts = math.max(1, rdd.getNumPartitions)
      Convolve.log.info(s"A partition holds more than ${conf.convolveMaxRunsPerPartition} runs of " +
        s"consecutive ids (${FerryConf.ConvolveMaxRuns}); re-laying out the series by id into $parts partitions.")
      rdd = selected.repartitionByRange(parts, col("id")).sortWithinPartitions("id").queryExecution.toRdd
      plans = plan(rdd, Int.MaxValue)
    }
    val m = $(mode)
    val l = taps
    val computePlan = ConvolvePlan.computePlan(plans.toSeq, n => haloSizes(n, l, m)._1, n => haloSizes(n, l, m)._2, nm)
    if (computePlan.n == 0) {
      return spark.createDataFrame(java.util.Collections.emptyList[Row](), outSchema)
    }
    val bc = spark.sparkContext.broadcast(computePlan)
    val params = paramsJson(computePlan.n)
    val out = rdd.mapPartitionsWithIndex((pid, rows) => Convolve.computePartition(pid, rows, bc, params, conf))
    spark.createDataFrame(out, outSchema)
  }

  override def copy(extra: ParamMap): Convolve = defaultCopy(extra)
}

object Convolve extends DefaultParamsReadable[Convolve] {

  private val log = LoggerFactory.getLogger(classOf[Convolve])

  /** Name of the worker stage. */
  val Stage = "convolve"

  val Modes: Seq[String] = Seq("full", "same", "valid")

  /** The columns sent to the worker, per convolve-wire.md. */
  private[ferry] val WireSchema: StructType = StructType(Seq(
    StructField("id", LongType, nullable = false), StructField("real", DoubleType, nullable = false),
    StructField("imag", DoubleType, nullable = false), StructField("halo", BooleanType, nullable = false)))

  private[ferry] def outputSchema(id: String, real: String, imag: String): StructType = StructType(Seq(
    StructField(id, LongType, nullable = false), StructField(real, DoubleType, nullable = false),
    StructField(imag, DoubleType, nullable = false)))

  override def load(path: String): Convolve = super.load(path)

  /**
   * In local mode the tasks run in this JVM: start the workers they will borrow now, so that
   * they come up while the planning pass runs instead of after it.
   */
  private[ferry] def prestartLocal(spark: org.apache.spark.sql.SparkSession, conf: FerryConf, partitions: Int): Unit =
    if (spark.sparkContext.isLocal && partitions > 0) {
      WorkerPool.get(conf).prestart(math.min(partitions, spark.sparkContext.defaultParallelism))
    }

  private def changed(detail: String) = new InvalidInputException(Stage, "Convolve's input changed between its " +
    s"planning pass and its compute pass: $detail. The DataFrame must give the same rows in the same order each " +
    "time it is computed: cache() or checkpoint() it before Convolve (e.g. when it comes from a random source or " +
    "an unordered shuffle).")

  /** Streams one partition's runs with their halos through a pooled worker. */
  private[ferry] def computePartition(pid: Int, rows: Iterator[InternalRow], bc: Broadcast[ComputePlan],
      paramsJson: String, conf: FerryConf): Iterator[Row] = {
    val runs = bc.value.partitions.getOrElse(pid, Array.empty[RunPlan])
    if (runs.isEmpty) {
      if (rows.hasNext) throw changed(s"partition $pid was empty when planned and now has rows")
      return Iterator.empty
    }
    val runner = new StageRunner(conf, Stage)
    val groups = ConvolvePlan.streamGroups(runs)
    val lastGroup = groups.length - 1
    val output = groups.iterator.zipWithIndex.flatMap { case (group, g) =>
      val input = new RunInput(pid, group, rows, checkEnd = g == lastGroup)
      runner.stream(Stage, paramsJson, WireSchema, input)((reader, msg) => toRows(reader, msg))
    }
    output ++ new Iterator[Row] { // returns the worker as soon as the output is exhausted
      def hasNext: Boolean = { runner.close(); false }
      def next(): Row = throw new NoSuchElementException
    }
  }

  private def toRows(reader: ArrowBatches.Reader, msg: com.google.protobuf.ByteString): Iterator[Row] = {
    val batch = reader.load(msg)
    val names = reader.sparkSchema.fieldNames
    val id = batch.column(names.indexOf("id"))
    val re = batch.column(names.indexOf("real"))
    val im = batch.column(names.indexOf("imag"))
    val n = batch.numRows()
    val out = new Array[Row](n)
    var i = 0
    while (i < n) {
      out(i) = new GenericRow(Array[Any](id.getLong(i), re.getDouble(i), im.getDouble(i)))
      i += 1
    }
    out.iterator
  }

  /**
   * The rows sent for a group of runs: for each run its left halo (halo = true), its own rows
   * as they arrive from Spark (halo = false, checked against the plan), then its right halo.
   */
  private final class RunInput(pid: Int, runs: Array[RunPlan], rows: Iterator[InternalRow], checkEnd: Boolean)
    extends Iterator[InternalRow] {
    private val row = new SpecificInternalRow(Seq(LongType, DoubleType, DoubleType, BooleanType))
    private var r = 0 // run index
    private var phase = 0 // 0 left halo, 1 own rows, 2 right halo
    private var i = 0L // index within the phase
    private var ready = false

    private def fill(id: Long, re: Double, im: Double, halo: Boolean): Unit = {
      row.setLong(0, id)
      row.setDouble(1, re)
      row.setDouble(2, im)
      row.setBoolean(3, halo)
      ready = true
    }

    private def sameBits(a: Double, b: Double) = java.lang.Double.doubleToLongBits(a) == java.lang.Double.doubleToLongBits(b)

    override def hasNext: Boolean = {
      while (!ready && r < runs.length) {
        val p = runs(r)
        val run = p.run
        phase match {
          case 0 =>
            if (i < p.leftRe.length) {
              fill(p.leftStart + i, p.leftRe(i.toInt), p.leftIm(i.toInt), halo = true)
              i += 1
            } else { phase = 1; i = 0 }
          case 1 =>
            if (i < run.length) {
              val expected = run.start + i
              if (!rows.hasNext) throw changed(s"partition $pid ended before id $expected")
              val in = rows.next()
              if (in.isNullAt(0) || in.getLong(0) != expected) {
                throw changed(s"partition $pid gave id ${if (in.isNullAt(0)) "null" else in.getLong(0)} where the " +
                  s"plan had id $expected")
              }
              if (in.isNullAt(1) || in.isNullAt(2)) throw changed(s"id $expected became null")
              val re = in.getDouble(1)
              val im = in.getDouble(2)
              val h = run.headRe.length
              if ((i < h && !(sameBits(re, run.headRe(i.toInt)) && sameBits(im, run.headIm(i.toInt)))) ||
                (i >= run.length - h && {
                  val t = (i - (run.length - h)).toInt
                  !(sameBits(re, run.tailRe(t)) && sameBits(im, run.tailIm(t)))
                })) {
                throw changed(s"the value of id $expected differs")
              }
              fill(expected, re, im, halo = false)
              i += 1
            } else { phase = 2; i = 0 }
          case _ =>
            if (i < p.rightRe.length) {
              fill(run.end + i, p.rightRe(i.toInt), p.rightIm(i.toInt), halo = true)
              i += 1
            } else { phase = 0; i = 0; r += 1 }
        }
      }
      if (!ready && checkEnd && rows.hasNext) {
        val extra = rows.next()
        throw changed(s"partition $pid has more rows than planned (id ${if (extra.isNullAt(0)) "null" else extra.getLong(0)})")
      }
      ready
    }

    override def next(): InternalRow = {
      if (!hasNext) throw new NoSuchElementException
      ready = false
      row
    }
  }
}
